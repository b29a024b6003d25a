"""Write the MMLU task YAMLs (57 subjects, 4 categories, the ``mmlu`` group) mirroring lm-eval 0.4's ``mmlu``.

    python -m prunekit.lm_tasks.make_mmlu

Same template as lm-eval's ``mmlu/default`` (prompt, A–D choices, description per subject, few-shot from
``dev`` with the first-n sampler, acc; groups average over all questions, weighted by size).
"""

from __future__ import annotations

import json
from pathlib import Path

from prunekit.tasks import MMLU_CATEGORIES

TEMPLATE = """\
# Shared by the MMLU subject YAMLs (not indexed: no .yaml suffix), as lm-eval's mmlu/default template.
custom_dataset: !function prunekit.lm_tasks.loaders.load
output_type: multiple_choice
test_split: evaluation
fewshot_split: dev
fewshot_config:
  sampler: first_n
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

ALIASES = {"stem": "stem", "other": "other", "social_sciences": "social sciences", "humanities": "humanities"}


def main(folder: Path = Path(__file__).parent / "mmlu") -> None:
    folder.mkdir(exist_ok=True)
    (folder / "_template_yaml").write_text(TEMPLATE)
    for category, subjects in MMLU_CATEGORIES.items():
        for subject in subjects:
            description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            (folder / f"mmlu_{subject}.yaml").write_text(
                "include: _template_yaml\n"
                f"task: mmlu_{subject}\n"
                f"task_alias: {subject}\n"
                f"tag: mmlu_{category}_tasks\n"
                f"dataset_kwargs:\n  prunekit_task: mmlu_{subject}\n"
                f"description: {json.dumps(description)}\n")
        (folder / f"_mmlu_{category}.yaml").write_text(
            f"group: mmlu_{category}\ngroup_alias: {ALIASES[category]}\ntask:\n  - mmlu_{category}_tasks\n"
            "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n")
    (folder / "_mmlu.yaml").write_text(
        "group: mmlu\ntask:\n" + "".join(f"  - mmlu_{c}\n" for c in MMLU_CATEGORIES)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n")


if __name__ == "__main__":
    main()
