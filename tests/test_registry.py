"""The method registry: each record's facts, and every reader driven by them (plan, config, pipeline, benches)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from sapt.config import SaptConfig
from sapt.methods.registry import METHOD_NAMES, REGISTRY, TrainsOn, get_method, resolve
from sapt.training.task_args import SaptArguments, plan
from sapt.utils.cli import UsageError
from test_layout import PACKAGE, import_graph

ORDER = ["a", "b", "c"]

# What each method is, written out by hand from docs/methods.md: the records must say the same.
# name: (block per task, routed, trains on, continues, ARM, loss terms (name, weight argument), exportable, hooks)
FACTS = {
    "sapt": (True, True, TrainsOn.OWN, True, True, [], True, None),
    "o_lora": (True, False, TrainsOn.OWN, True, False, [("orthogonality", "orthogonal_weight"), ("l2", "l2_weight")],
               False, None),
    "single": (False, False, TrainsOn.ALONE, False, False, [], False, None),
    "seq_lora": (False, False, TrainsOn.OWN, True, False, [], False, None),
    "replay": (False, False, TrainsOn.OWN_AND_MEMORY, True, False, [], False, None),
    "mtl": (False, False, TrainsOn.LEARNED, False, False, [], False, None),
    "inflora": (True, False, TrainsOn.OWN, True, False, [], False, "InfLoRAHooks"),
}


def test_every_method_has_a_record_saying_what_the_docs_say():
    assert list(METHOD_NAMES) == ["sapt", "o_lora", "single", "seq_lora", "replay", "mtl", "inflora"]
    for name, (per_task, routed, trains_on, continues, arm, terms, exportable, hooks) in FACTS.items():
        method = get_method(name)
        assert (method.name, method.block_per_task, method.routed, method.trains_on, method.continues) == (
            name, per_task, routed, trains_on, continues)
        assert method.reflection == method.needs_pseudo_data == arm
        assert [(t.name, t.weight_argument) for t in method.loss_terms] == terms
        assert method.exportable == exportable and method.summary
        assert (None if method.hooks is None else method.hooks.rsplit(":", 1)[1]) == hooks


def test_every_reference_of_a_record_resolves():
    from sapt.inflora import SUBSPACE_FILE, InfLoRAHooks
    from sapt.o_lora import l2_loss, orthogonality_loss

    assert [resolve(t.loss) for t in get_method("o_lora").loss_terms] == [orthogonality_loss, l2_loss]
    inflora = get_method("inflora")
    assert isinstance(inflora.make_hooks(), InfLoRAHooks)
    assert [resolve(ref) for ref in inflora.task_tensor_files] == [SUBSPACE_FILE]
    for method in REGISTRY.values():
        for spec in method.loss_terms:
            assert callable(resolve(spec.loss)) and spec.weight_argument in SaptArguments.__dataclass_fields__
        assert (method.make_hooks() is None) == (method.hooks is None)


def expected_plan(method, position: int, no_reflection: bool = False) -> dict:
    """What a step at `position` of ORDER reads, from the record's facts alone (not through plan())."""
    task = ORDER[position]
    if method.trains_on is TrainsOn.ALONE:
        learned = [task]
    else:
        learned = ORDER[: position + 1]
    earlier = learned[:-1]
    return {
        "learned": learned,
        "continues": position > 0 and method.continues,
        "training_tasks": {TrainsOn.LEARNED: learned}.get(method.trains_on, [task]),
        "memory_tasks": earlier if method.trains_on is TrainsOn.OWN_AND_MEMORY else [],
        "pseudo_tasks": earlier if method.reflection and not no_reflection else [],
        "probe_tasks": learned if method.routed else [],
    }


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_plan_follows_the_record(name, position):
    for no_reflection in (False, True):
        args = SaptArguments(model_name_or_path="m", task_order=",".join(ORDER), task=ORDER[position], method=name,
                             no_reflection=no_reflection, previous_task_dir="prev")
        task_plan = plan(args)
        found = {key: getattr(task_plan, key) for key in expected_plan(get_method(name), position)}
        assert found == expected_plan(get_method(name), position, no_reflection)
        assert task_plan.previous_folder() == (Path("prev") if found["continues"] else None)


def test_the_plans_of_the_existing_methods_at_task_three():
    """The same facts spelled out for the last task of a b c (a check on expected_plan itself)."""
    plans = {}
    for name in ["sapt", "o_lora", "single", "seq_lora", "replay", "mtl"]:
        task_plan = plan(SaptArguments(model_name_or_path="m", task_order="a,b,c", task="c", method=name))
        plans[name] = (task_plan.learned, task_plan.continues, task_plan.training_tasks, task_plan.memory_tasks,
                       task_plan.pseudo_tasks)
    assert plans == {
        "sapt": (ORDER, True, ["c"], [], ["a", "b"]),
        "o_lora": (ORDER, True, ["c"], [], []),
        "single": (["c"], False, ["c"], [], []),
        "seq_lora": (ORDER, True, ["c"], [], []),
        "replay": (ORDER, True, ["c"], ["a", "b"], []),
        "mtl": (ORDER, False, ORDER, [], []),
    }


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_config_reads_routing_and_blocks_from_the_record(name):
    config = SaptConfig(base_model_name_or_path="m", model_type="t5", is_encoder_decoder=True, hidden_size=8, method=name)
    assert (config.routed, config.block_per_task) == (get_method(name).routed, get_method(name).block_per_task)


def test_an_unknown_method_is_one_line_listing_the_choices():
    listing = "sapt, o_lora, single, seq_lora, replay, mtl, inflora"
    for call in (lambda: get_method("ewc"), lambda: SaptConfig("m", "t5", True, 8, method="ewc")):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == f"unknown method 'ewc'; use one of {listing}"
    with pytest.raises(UsageError, match=f"^--method: unknown method 'ewc'; use one of {listing}$"):
        plan(SaptArguments(model_name_or_path="m", task_order="a", task="a", method="ewc"))


@pytest.mark.parametrize("preset", ["superni_t5", "long_t5", "superni_llama", "long_llama"])
def test_the_generators_offer_the_registry_methods(preset):
    from test_help import generator_parser

    (action,) = [a for a in generator_parser(preset)._actions if a.dest == "method"]
    assert list(action.choices) == list(METHOD_NAMES)
    for name in METHOD_NAMES:
        assert f"{name}: {get_method(name).summary}" in action.help


def test_train_task_and_the_benches_accept_the_registry_methods():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import cl_behaviour
    import cl_real

    assert SaptArguments.__dataclass_fields__["method"].metadata["choices"] == list(METHOD_NAMES)
    # cl_real: its two SAPT variants and every method not trained alone (single always runs, as the reference).
    assert cl_real.CHOICES == ["sapt", "sapt_paper", "o_lora", "seq_lora", "replay", "mtl", "inflora"]
    assert cl_real.parse_args(["--methods", "inflora,o_lora", "--tasks", "x,y"]).methods == ["inflora", "o_lora"]
    assert cl_behaviour.sequential_methods() == ["sapt", "o_lora", "seq_lora", "replay", "inflora"]


def test_the_registry_is_plain_data_below_the_model():
    """sapt.config (below the model) imports the records: they import no module of the package, and the code
    they name is imported only when a step needs it."""
    graph = import_graph(PACKAGE)
    assert graph["sapt.methods.registry"] == set()
    assert "sapt.methods.registry" in graph["sapt.config"]
    assert graph["sapt.methods"] == set()


def test_a_task_args_record_leaves_out_an_unset_inflora_batches():
    """task_args.json of the existing methods keeps its keys; a set value is recorded."""
    from transformers import Seq2SeqTrainingArguments

    from sapt.training.task_args import task_args_record

    training = Seq2SeqTrainingArguments(output_dir="o", use_cpu=True, report_to="none")
    args = SaptArguments(model_name_or_path="m", task_order="a", task="a")
    assert "inflora_batches" not in task_args_record(args, training)
    args.inflora_batches = 3
    record = task_args_record(args, training)
    assert record["inflora_batches"] == 3 and json.loads(json.dumps(record)) == record
