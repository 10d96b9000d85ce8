"""The run folder: its files and their names, one process at a time, signals, checkpoints, what a resume does.

``rundir`` is the only module that knows artifact file names; ``runlock`` keeps one process per
folder; ``signals`` turns SIGTERM and SIGHUP into a save at the next step boundary; ``trainer_checkpoints``
says when a checkpoint counts (its completion marker) and rotates them; ``fingerprints`` records the
data a run started on; ``resuming`` decides what `--resume` does.
"""
