"""Every key flaxtl reads, with its default and a one-line meaning.

Not a runnable config itself: the files next to it call `base.get_base()` and
override what their recipe changes. `--config.KEY=VALUE` overrides any key on
the command line; an unknown key or a wrong type is rejected (locked config).
"""

import ml_collections


def get_base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Init, dropout and shuffling randomness (the split has its own seed).

  c.model = ml_collections.ConfigDict()
  c.model.name = "vgg"  # 'vgg' (backbone + head), or the pixel baselines 'mlp' / 'cnn'.
  c.model.arch = "vgg16"  # 'vgg16' or 'vgg19'.
  c.model.num_classes = 0  # Output classes; 0 takes the data's class count (a mismatch is an error).
  c.model.head = "keras_top"  # 'keras_top' (fc1, fc2 + new predictions), 'mlp' or 'linear'.
  c.model.feature_layer = "block5_pool"  # Backbone layer the mlp/linear head reads.
  c.model.pooling = ml_collections.FieldReference(None, field_type=str)  # None (flatten), 'avg', 'max'.
  c.model.hidden = (1000, 500, 150)  # mlp head widths (the tutorial's).
  c.model.activations = ("relu", "sigmoid", "sigmoid")  # mlp head activations.
  c.model.dropout = (0.3, 0.4, 0.2)  # mlp head dropout after each hidden layer (really applied).
  c.model.head_init = "glorot_uniform"  # Head kernel init: 'glorot_uniform' or Keras 'uniform'.
  c.model.weights = "imagenet"  # 'imagenet', 'hed', a converted checkpoint dir, a Keras file, or 'none'.
  c.model.dtype = "float32"  # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  c.model.conv_impl = "auto"  # 3x3 convs: 'auto' (per layer), 'direct', 'im2col', 'winograd' (CPU speed).
  c.model.cache_features = False  # mlp/linear head on a frozen backbone: extract features once, train the head.
  c.model.features_cache_dir = "workdirs/feature_cache"  # Where cached features live (shared across runs).

  c.image_size = 224  # Square model input; images are resized on device inside the step.
  c.preprocess = "caffe"  # 'caffe' (VGG preprocess_input), 'unit' ([0, 1]) or 'none'.

  c.data = ml_collections.ConfigDict()
  c.data.source = "mnist_sample"  # mnist_sample | csv:PATH | folder:PATH | tfds:NAME[:SPLIT] | npz:PATH.
  c.data.test_source = ml_collections.FieldReference(None, field_type=str)  # Optional held-out data.
  c.data.val_fraction = 0.2  # Fraction of the train pool held out for validation.
  c.data.split_seed = 42  # Seed of the train/validation split (the tutorial's random_state).
  c.data.stratify = True  # Keep class proportions equal across the split.
  c.data.load_size = ml_collections.FieldReference(None, field_type=int)  # Host resize for mixed sizes.
  c.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir.
  c.data.max_examples = ml_collections.FieldReference(None, field_type=int)  # Cap the train pool.
  c.data.augment = False  # Random crop/flip on device (off for digits).
  c.data.prefetch = 2  # Batches prepared ahead on a background thread.

  c.freeze = ml_collections.ConfigDict()
  c.freeze.first_layers = 0  # Freeze Keras model.layers[:k] (input and pooling layers count).
  c.freeze.rules = ()  # Extra ((regex, 'frozen'|'trainable'), ...) over param paths; first match wins.
  c.freeze.lr_mults = ()  # ((regex, multiplier), ...) learning-rate multipliers for trainable params.
  c.freeze.phases = ()  # Gradual unfreezing: ((epoch, first_layers), ...) from that epoch on.

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"  # 'sgd', 'adam' or 'adamw'.
  c.optim.lr = 1e-3  # Base learning rate.
  c.optim.schedule = "keras_decay"  # 'constant', 'cosine' or 'keras_decay' (lr / (1 + decay * step)).
  c.optim.decay = 0.0  # Keras 2 `decay` for the keras_decay schedule.
  c.optim.warmup_steps = 0  # Linear warm-up steps before the schedule.
  c.optim.cosine_alpha = 0.0  # Final lr fraction of the cosine schedule.
  c.optim.momentum = 0.9  # SGD momentum (0 for plain SGD).
  c.optim.nesterov = True  # SGD Nesterov momentum.
  c.optim.b1 = 0.9  # Adam beta1.
  c.optim.b2 = 0.999  # Adam beta2.
  c.optim.eps = 1e-7  # Adam epsilon (Keras' default).
  c.optim.weight_decay = 0.0  # AdamW decoupled weight decay.
  c.optim.wd_mask = ".*/kernel"  # Params (regex, fullmatch) that AdamW decays.
  c.optim.clip_norm = 0.0  # Clip trainable grads to this global norm (0: off).

  c.batch_size = 16  # Global batch size, split across all devices and hosts.
  c.num_epochs = 10  # Training epochs.
  c.total_steps = 0  # If > 0, train exactly this many steps instead of num_epochs.
  c.eval_every_epochs = 1  # Validate every this many epochs (and at the end).
  c.eval_batch_size = 64  # Global eval batch size.
  c.log_every_steps = 20  # Train-metric logging period.
  c.checkpoint_every_steps = 200  # Periodic checkpoint period (plus one at the end).
  c.max_to_keep = 2  # Checkpoints kept in the workdir.
  c.nan_policy = "stop"  # 'stop' (raise with the step number) or 'skip' (drop the update).
  c.log_grad_norm = True  # Log the global norm of trainable gradients.
  c.progress = True  # Show a progress bar with ETA and images/s.
  c.tune_malloc = True  # glibc keeps freed memory for reuse: CPU steps +19-30%, RSS stays at its peak.
  c.xla_cpu_ynn = "auto"  # XLA:CPU YNNPACK convs: 'auto' (off from 128 px or while block1 trains), 'on', 'off'.

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)  # host:port.
  c.distributed.num_processes = 1  # Processes in the job (1: single process).
  c.distributed.process_id = 0  # This process's index.
  c.distributed.cpu_collectives = "gloo"  # CPU cross-process collectives implementation.
  return c


def offline_small(c: ml_collections.ConfigDict) -> None:
  """The CPU-sized variant the offline recipes share: a 256-unit dense head at 64x64.

  HED weights have no fc1/fc2, and 224x224 costs ~12x more compute than 64x64.
  """
  c.model.head = "mlp"  # A fresh dense head instead of the Keras top.
  c.model.hidden = (256,)
  c.model.activations = ("relu",)
  c.model.dropout = (0.0,)
  c.image_size = 64  # 2x2x512 block5_pool features.
