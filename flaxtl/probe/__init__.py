"""Transfer evaluation: few-shot, linear and kNN probes (`python -m
flaxtl.probe`); see `flaxtl.probe.__main__` for the command line."""
