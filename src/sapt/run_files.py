"""The run-folder format: the name of every file a task step writes and the scorer, generator,
re-evaluation and importer read.

A run's ``outputs/`` holds TASK_ORDER_FILE and one ``<i>-<task>/`` folder per trained task (see the
README's run-folder format). Defined here, at the bottom of the package and without torch, so that the
method's ``checkpoint`` and the harness's writer and scorer import the same names.
"""

TASK_ORDER_FILE = "task_order.txt"
RESULTS_FILE = "all_results.json"
COMPLETE_FILE = "task_complete.json"  # written last by a finished task step: its folder is whole
ROUTING_FILE = "routing_weights.json"  # mean routing of each seen task's test inputs, after this task
# What the task step was trained and evaluated with (train_task's arguments): for re-evaluation and reports.
TASK_ARGS_FILE = "task_args.json"
# Test predictions of a task folder: PREDICTIONS_DIR/<task>.jsonl, one record per test input; for a
# routed model each record carries under ROUTING_KEY the routing weights that input got (oldest block first).
PREDICTIONS_DIR = "predictions"
ROUTING_KEY = "routing"
