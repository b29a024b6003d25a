"""lm-eval task definitions over packaged data (see ``prunekit.tasks``); indexed by ``prunekit.tasks.task_manager``."""
