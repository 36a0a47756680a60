"""The environment the train/selfplay.py subprocess tests run the script under.

Offline Hugging Face hub, quiet tokenizers, one OpenMP thread, and none of the fault-injection
variables (IRIS_SELFPLAY_KILL_AT, IRIS_SELFPLAY_NAN_STEPS) inherited from the caller; ``extra``
overrides or adds variables last.
"""
import os


def selfplay_env(**extra):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    for k in ("IRIS_SELFPLAY_KILL_AT", "IRIS_SELFPLAY_NAN_STEPS"):
        env.pop(k, None)
    env.update(extra)
    return env
