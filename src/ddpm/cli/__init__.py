"""The command layer: `ddpm-train` (and `python train.py`), `ddpm-sample`, `ddpm-eval`.

The only place with `hydra.main`, `sys.exit` and the printing of user errors; everything it
calls lives in the library (`ddpm.*`), which never imports from here.
"""
