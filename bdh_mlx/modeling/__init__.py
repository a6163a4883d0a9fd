"""The parts of the model beside its equations (``bdh_mlx/model.py``): the recurrent state, quantized weights,
the bounds of a config, recomputation in the backward pass."""
