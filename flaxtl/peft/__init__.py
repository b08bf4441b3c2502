"""Parameter-efficient fine-tuning (LoRA, DoRA, BitFit, norm, prompt, adapters).

Adapters are ordinary parameters under `params['peft']`, so freezing
(`optax.multi_transform` labels), checkpoints, exact resume and data parallel
work unchanged; `flaxtl.peft.core.PeftModel` wraps a run's model and adds the
adapters at call time. `python -m flaxtl.peft merge|export|apply` folds the
low-rank updates in, writes adapter-only checkpoints and loads them back.
"""
