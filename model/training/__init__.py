"""Training, one home per part: ``config`` (TrainConfig), ``processes`` (torchrun ranks, logging),
``batches`` (split, cache, samplers, batches), ``recipe`` (network, optimizer, schedule, loss),
``loop`` (Trainer), ``report`` (calibration and the final evaluations), ``run`` (train) and
``cli`` (the flags, generated from TrainConfig). ``model.train`` is the public face."""
