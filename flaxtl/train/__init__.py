"""Training: `train_and_evaluate(config, workdir)` and what it is made of.

Its modules, in the order a run uses them:

    config      checks on a config before any work
    setup       model, initial variables, pretrained merge, freeze plan, BN mode
    freeze      (regex, label) rules -> a Plan; optim turns it into optax
    steps       the jitted train / eval / predict steps
    checkpoint  orbax training checkpoints and final variables
    metrics     log loss, metric files, NaN checks
    features    cached backbone features (the tutorial's scenario 1)
    distributed one device or many hosts: mesh, shardings, global batches
    sharding    FSDP-style rules: params and optimiser state over the mesh
    loop        the run itself
"""

from flaxtl.train.loop import train_and_evaluate
from flaxtl.train.metrics import NonFiniteLoss

__all__ = ["NonFiniteLoss", "train_and_evaluate"]
