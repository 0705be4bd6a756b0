"""Training: pytorch-lightning modules that subclass the inference models, so a training checkpoint's
`state_dict` has the original key layout and loads straight into txt2img."""
