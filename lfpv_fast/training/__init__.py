"""Training: the trainer (`trainer.py`), its run folder (`run_folder.py`: every file name of a run), checkpoints
(`checkpoint.py`: atomic writes, `weights_only` reads), multi-node agreements (`distributed.py`), the fast-path
switches of a run (`fast_path.py`), losses and the validation metrics (also used by `python -m
lfpv_fast.evaluate`)."""
