"""What a model is and where it comes from: config, the attention math, the native model, presets,
checkpoints, upstream bsbr, users' modules, and the spec every later stage reads."""
