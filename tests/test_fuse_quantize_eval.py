"""fuse -> quantize -> eval -> generate on a tiny model trained for a few steps."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import cli, make_project, set_params, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A project whose base, sanitized splits and adapter exist (module-scoped: built once)."""
    project = make_project(tmp_path_factory.mktemp("fqe") / "project", tiny_model_dir)
    shutil.copy(
        project / "data" / "sanitized" / "valid.jsonl",
        project / "data" / "sanitized" / "test.jsonl",
    )
    set_params(
        project,
        **{
            "train.iters": 40,
            "train.steps_per_eval": 20,
            "train.save_every": 20,
            "quantize.group_size": 32,
            "eval.batch_size": 4,
        },
    )
    result = train(project)
    assert result.returncode == 0, result.stderr
    return project


def test_fuse_matches_base_plus_adapter_and_loads_in_mlx_lm(trained: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load

    result = cli(trained, "fuse")
    assert result.returncode == 0, result.stderr
    check = json.loads((trained / "metrics" / "fuse.json").read_text())
    assert check["greedy_agreement"] == 1.0 and check["max_relative_logit_diff"] < 1e-4

    fused, tokenizer = load(str(trained / "models" / "fused"))
    tuned, _ = load(
        str(trained / "models" / "base"), adapter_path=str(trained / "models" / "adapters")
    )
    ids = mx.array([tokenizer.encode("Please meet Alice on day 3 about item 7.")])
    assert mx.allclose(fused(ids), tuned(ids), atol=1e-4)


def test_fuse_refuses_an_adapter_for_another_model(trained: Path, tmp_path: Path) -> None:
    project = tmp_path / "other"
    shutil.copytree(trained, project, ignore=shutil.ignore_patterns("fused", "quantized"))
    config = json.loads((project / "models" / "adapters" / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 4  # the saved tensors are rank 8: they no longer fit
    (project / "models" / "adapters" / "adapter_config.json").write_text(json.dumps(config))
    result = cli(project, "fuse")
    assert result.returncode == 1
    assert "models/adapters does not match models/base" in result.stderr
    assert "dvc repro train" in result.stderr


def test_quantize_records_size_and_quality_cost(trained: Path) -> None:
    if not (trained / "models" / "fused").exists():
        assert cli(trained, "fuse").returncode == 0
    result = cli(trained, "quantize")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((trained / "metrics" / "quantize.json").read_text())
    assert metrics["bits"] == 4 and metrics["size_ratio"] < 0.5
    assert metrics["val_loss_quantized"] == pytest.approx(
        metrics["val_loss_fused"] + metrics["val_loss_increase"], abs=1e-4
    )
    config = json.loads((trained / "models" / "quantized" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4


def test_eval_scores_every_model_and_writes_the_report(trained: Path) -> None:
    for stage, output in (("fuse", "fused"), ("quantize", "quantized")):
        if not (trained / "models" / output).exists():
            assert cli(trained, stage).returncode == 0
    result = cli(trained, "report")
    assert result.returncode == 1  # nothing evaluated yet: the report names the stage to run
    assert "metrics/eval/base.json: not found; run `dvc repro eval@base`" in result.stderr
    for model in ("base", "tuned", "quantized"):
        result = cli(trained, "eval", model)
        assert result.returncode == 0, result.stderr
    assert cli(trained, "report").returncode == 0
    metrics = {
        model: json.loads((trained / "metrics" / "eval" / f"{model}.json").read_text())[model]
        for model in ("base", "tuned", "quantized")
    }
    for scores in metrics.values():
        assert {"test_loss", "exact_match", "field_f1", "chrf", "compression_ratio"} <= set(scores)
        assert 0 <= scores["exact_match"] <= 1
    # Training lowered the test loss of the tiny model (its validation split is the test here).
    assert metrics["tuned"]["test_loss"] < metrics["base"]["test_loss"]
    for model in metrics:
        generations = (trained / "reports" / "generations" / f"{model}.jsonl").read_text()
        assert len(generations.splitlines()) == 8
    report = (trained / "reports" / "eval.md").read_text()
    assert "| metric | base | tuned | quantized |" in report and "worst tuned first" in report
    scores = json.loads((trained / "reports" / "eval_scores.json").read_text())
    assert [s["model"] for s in scores] == ["base", "tuned", "quantized"]


def test_eval_names_the_models_it_knows(trained: Path) -> None:
    result = cli(trained, "eval", "tunde")
    assert result.returncode == 1
    assert "'tunde' is not in eval.models (base, tuned, quantized)" in result.stderr


def test_eval_generates_once_per_prompt_and_scores_the_best_of_its_references(
    trained: Path, tmp_path: Path
) -> None:
    """SciTLDR-like data: one prompt, several reference answers (split keeps them together)."""
    if not (trained / "models" / "fused").exists():
        assert cli(trained, "fuse").returncode == 0
    project = tmp_path / "refs"
    shutil.copytree(trained, project, ignore=shutil.ignore_patterns("quantized"))
    test = project / "data" / "sanitized" / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    wrong = {
        **rows[0],
        "messages": [*rows[0]["messages"][:-1], {"role": "assistant", "content": "x"}],
    }
    test.write_text("".join(json.dumps(r) + "\n" for r in [wrong, *rows]))
    set_params(
        project,
        **{"eval.models": {"tuned": "models/fused"}, "eval.metrics": ["exact_match", "chrf"]},
    )
    result = cli(project, "eval", "tuned")
    assert result.returncode == 0, result.stderr
    assert cli(project, "report").returncode == 0
    generations = [json.loads(g) for g in (project / "reports/generations/tuned.jsonl").open()]
    assert len(generations) == len(rows)  # 9 rows, 8 distinct prompts
    first = generations[0]
    assert first["references"] == 2 and first["source"] == wrong["meta"]["source"]
    # The best-matching reference is kept: the tuned model's answer is nearer the real one.
    assert first["reference"] == rows[0]["messages"][-1]["content"]
    report = (project / "reports" / "eval.md").read_text()
    assert "9 rows (8 distinct prompts" in report


def test_eval_without_a_test_split_names_the_stage(trained: Path, tmp_path: Path) -> None:
    project = tmp_path / "p"
    shutil.copytree(trained, project)
    (project / "data" / "sanitized" / "test.jsonl").unlink()
    result = cli(project, "eval", "base")
    assert result.returncode == 1
    assert "test.jsonl: not found; run `dvc repro sanitize`" in result.stderr


def test_generate_says_which_model_it_loaded(trained: Path, tmp_path: Path) -> None:
    project = tmp_path / "g"
    shutil.copytree(trained, project, ignore=shutil.ignore_patterns("quantized", "fused"))
    result = cli(project, "generate", "Please meet Alice on day 3 about item 7.")
    assert result.returncode == 0, result.stderr
    assert "[lorapipe] model: adapters (models/base + models/adapters)" in result.stderr
    shutil.rmtree(project / "models")
    missing = cli(project, "generate", "hi")
    assert missing.returncode == 1
    assert "no model to generate with" in missing.stderr and "dvc repro quantize" in missing.stderr


def test_qlora_on_a_quantized_base_trains_and_fuses_without_losing_the_update(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """QLoRA: a 4-bit base trains (LoRA on QuantizedLinear layers) and fuses on dequantized
    weights, so the fused model equals base + adapter instead of the base re-rounded."""
    import mlx.core as mx
    from mlx_lm import load

    from lorapipe.params import load_params
    from lorapipe.stages.base import import_base_model

    project = make_project(tmp_path / "project", tiny_model_dir)
    shutil.rmtree(project / "models" / "base")
    model = dataclasses.replace(
        load_params(project / "params.yaml").model,
        source=str(tiny_model_dir),
        quantize_bits=4,
        quantize_group_size=32,
    )
    import_base_model(model, project / "models" / "base")
    assert "quantization" in json.loads((project / "models" / "base" / "config.json").read_text())
    set_params(
        project,
        **{
            "train.iters": 30,
            "train.steps_per_eval": 15,
            "train.save_every": 15,
            "train.learning_rate": 1e-2,
        },
    )

    assert (result := train(project)).returncode == 0, result.stderr
    assert (result := cli(project, "fuse")).returncode == 0, result.stderr
    check = json.loads((project / "metrics" / "fuse.json").read_text())
    assert check["greedy_agreement"] == 1.0 and check["max_relative_logit_diff"] < 1e-3

    fused_config = json.loads((project / "models" / "fused" / "config.json").read_text())
    assert "quantization" not in fused_config  # the quantize stage quantizes, not fuse
    fused, tokenizer = load(str(project / "models" / "fused"))
    base, _ = load(str(project / "models" / "base"))
    tuned, _ = load(
        str(project / "models" / "base"), adapter_path=str(project / "models" / "adapters")
    )
    ids = mx.array([tokenizer.encode("Please meet Alice on day 3 about item 7.")])
    update = mx.abs(tuned(ids) - base(ids)).max().item()
    assert update > 1e-2, "the adapter changes the quantized model's output"
    assert mx.abs(fused(ids) - tuned(ids)).max().item() < 1e-3 * max(update, 1.0)


def test_generate_passes_over_a_quantized_model_that_quantizing_made_worse(
    trained: Path, tmp_path: Path
) -> None:
    """The generation policy: quantize's measured cost decides whether generate loads it."""
    project = tmp_path / "policy"
    shutil.copytree(trained, project)
    if not (project / "models" / "quantized").is_dir():
        assert cli(project, "fuse").returncode == 0
        assert cli(project, "quantize").returncode == 0
    cost = json.loads((project / "metrics" / "quantize.json").read_text())["val_loss_increase"]
    assert cost > 0, "4-bit quantization of the tiny model raises its loss"

    set_params(project, **{"generate.quantized_max_loss_increase": cost / 2})
    strict = cli(project, "generate", "Please meet Alice on day 3 about item 7.")
    assert strict.returncode == 0, strict.stderr
    assert f"quantized passed over: its validation loss is {cost:.4f} above" in strict.stderr
    assert "[lorapipe] model: fused (models/fused)" in strict.stderr

    set_params(project, **{"generate.quantized_max_loss_increase": cost * 2})
    lenient = cli(project, "generate", "Please meet Alice on day 3 about item 7.")
    assert "[lorapipe] model: quantized (models/quantized)" in lenient.stderr
    assert "passed over" not in lenient.stderr


def test_fuse_checks_a_bfloat16_model_at_bfloat16_precision(trained: Path, tmp_path: Path) -> None:
    """bfloat16 rounds at 2^-8: a correct fuse differs from base + adapter by more than
    fuse.logits_rtol's 1e-3 there (as float32 does on CUDA, in TF32); the check allows the
    arithmetic's rounding and still requires the same greedy tokens."""
    import mlx.core as mx

    project = tmp_path / "bf16"
    shutil.copytree(trained, project, ignore=shutil.ignore_patterns("fused", "quantized"))
    for weights in (project / "models" / "base").glob("*.safetensors"):
        arrays = mx.load(str(weights))
        mx.save_safetensors(str(weights), {k: v.astype(mx.bfloat16) for k, v in arrays.items()})
    result = cli(project, "fuse")
    assert result.returncode == 0, result.stderr
    check = json.loads((project / "metrics" / "fuse.json").read_text())
    assert check["logits_rtol"] == 8 * 2.0**-8 and check["greedy_agreement"] == 1
    assert check["max_relative_logit_diff"] > 1e-3, "the float32 tolerance would refuse it"
