"""Moved: evaluating heads reads calibration's per-token statistics, so it lives in the calibration stage."""

raise ImportError("exitspec.heads.evaluate moved to exitspec.calibration.evaluate (the `exitspec eval-heads` command "
                  "is exitspec.commands.eval_heads)")
