"""Calibration of exit confidence: held-out sequences, per-token exit statistics, thresholds, estimators.

sequences.py  held-out prompts (calibration and evaluation take disjoint halves), greedy / reference
              continuations, and the one teacher forward that yields every exit's hidden state
collect.py    per-token KL, CE, agreement and confidence scores of every exit of one or more bundles
thresholds.py maximal-coverage threshold reaching a target agreement
estimator.py  training the learned confidence estimator (cross-fitted)
calibrate.py  calibrate_bundle(): the above, written into bundle.config.thresholds
prompt_reference.py  how hard the calibration prompts read to each exit: the reference run-time
              adaptation (decoding/adapt.py) shifts thresholds from, stored beside them
cli.py        `exitspec calibrate`
"""
