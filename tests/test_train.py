"""The train stage on the tiny model: masking, resume after SIGKILL and Ctrl-C, the NaN guard."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    ITERS,
    REPO,
    make_project,
    make_rows,
    outcome,
    set_params,
    start,
    train,
    wait_for_checkpoint,
)


@pytest.fixture
def train_project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return make_project(tmp_path / "project", tiny_model_dir)


def assert_same_run(a: Path, b: Path) -> None:
    import mlx.core as mx

    adapters_a, train_a, val_a = outcome(a)
    adapters_b, train_b, val_b = outcome(b)
    assert adapters_a.keys() == adapters_b.keys()
    for name in adapters_a:
        assert mx.allclose(adapters_a[name], adapters_b[name], rtol=1e-5, atol=1e-6), name
    assert train_a == train_b and val_a == val_b
    assert len(train_a) == ITERS // 10 + 1  # header + one row per report


@pytest.fixture
def uninterrupted(train_project: Path, tmp_path: Path) -> Path:
    reference = tmp_path / "reference"
    shutil.copytree(train_project, reference)
    result = train(reference)
    assert result.returncode == 0, result.stderr
    return reference


def test_kill_then_resume_gives_the_uninterrupted_result(
    train_project: Path, uninterrupted: Path
) -> None:
    proc = start(train_project)
    wait_for_checkpoint(train_project, proc, ITERS // 2)
    proc.send_signal(signal.SIGKILL)  # no handler runs: like a power cut
    proc.communicate()

    # Recomputing activations changes the memory, not the maths: the checkpoint still resumes.
    set_params(train_project, **{"train.grad_checkpoint": -1})
    resumed = train(train_project)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from models/checkpoints/step-" in resumed.stdout
    assert "memory: 2 of 2 blocks recompute their activations" in resumed.stdout
    assert_same_run(train_project, uninterrupted)
    summary = json.loads((train_project / "metrics" / "train.json").read_text())
    assert summary["steps"] == ITERS and summary["recomputed_blocks"] == 2
    reference = json.loads((uninterrupted / "metrics" / "train.json").read_text())
    assert reference["recomputed_blocks"] == 0  # auto, and the step fits in the free RAM
    # A run resumed at its end trains nothing, yet reports the run's peak memory, not its own.
    again = train(train_project)
    assert again.returncode == 0, again.stderr
    log = train_project / "dvclive" / "train" / "plots" / "metrics" / "train" / "peak_memory_gb.tsv"
    peaks = [float(line.split("\t")[-1]) for line in log.read_text().splitlines()[1:]]
    after = json.loads((train_project / "metrics" / "train.json").read_text())
    assert after["peak_memory_gb"] >= round(max(peaks), 3) > 0


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(
    train_project: Path, uninterrupted: Path
) -> None:
    proc = start(train_project)
    wait_for_checkpoint(train_project, proc, 20)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGINT at step" in err and "run `dvc repro train` to resume" in err
    assert not (train_project / "models" / "adapters").exists(), "no complete-looking output"

    resumed = train(train_project)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(train_project, uninterrupted)


def test_the_adapter_loads_in_plain_mlx_lm_and_changes_the_model(uninterrupted: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load

    base, tokenizer = load(str(uninterrupted / "models" / "base"))
    tuned, _ = load(
        str(uninterrupted / "models" / "base"),
        adapter_path=str(uninterrupted / "models" / "adapters"),
    )
    ids = mx.array([tokenizer.encode("Please meet Alice on day 3 about item 7.")])
    assert not mx.allclose(base(ids), tuned(ids))
    config = json.loads((uninterrupted / "models" / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 8

    summary = json.loads((uninterrupted / "metrics" / "train.json").read_text())
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    val = (uninterrupted / "dvclive/train/plots/metrics/val/loss.tsv").read_text().splitlines()
    first, best = float(val[1].split("\t")[-1]), summary["best_val_loss"]
    assert best < 0.5 * first, "the tiny model learns the task"


def test_a_changed_param_starts_fresh_with_a_message(uninterrupted: Path) -> None:
    set_params(uninterrupted, **{"lora.rank": 4})
    result = train(uninterrupted)
    assert result.returncode == 0, result.stderr
    assert "was made with other params, data or base model: training from step 0" in result.stdout


def test_non_finite_loss_stops_naming_the_step_and_checkpoint(train_project: Path) -> None:
    set_params(
        train_project,
        **{
            "train.optimizer": "sgd",
            "train.learning_rate": 1.0e30,
            "train.lr_schedule": "constant",
            "train.warmup_steps": 0,
        },
    )
    result = train(train_project)
    assert result.returncode == 1
    assert "non-finite loss or gradient at step" in result.stderr
    assert "the last good checkpoint is kept in models/checkpoints" in result.stderr
    assert not (train_project / "models" / "adapters").exists()


def test_rows_longer_than_max_seq_length_fail_early(train_project: Path) -> None:
    set_params(train_project, **{"train.max_seq_length": 16})
    result = train(train_project)
    assert result.returncode == 1
    assert "train.max_seq_length: 16 is shorter than the longest train row" in result.stderr


def test_a_step_that_does_not_fit_in_memory_fails_before_training(train_project: Path) -> None:
    set_params(train_project, **{"train.memory_limit_gb": 0.001})
    result = train(train_project)
    assert result.returncode == 1
    assert "train: a step on the longest batch (4x" in result.stderr
    assert "more than the 0.00 GB of train.memory_limit_gb" in result.stderr
    assert "lower train.batch_size" in result.stderr
    checkpoints = train_project / "models" / "checkpoints"
    assert not list(checkpoints.glob("step-*")), "no step may run before the check"
    assert not (train_project / "models" / "adapters").exists()


def test_every_assistant_turn_is_learned_and_nothing_else(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from lorapipe.batches import encode

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    row = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "second answer"},
        ]
    }
    example = encode(row, tokenizer, mask_prompt=True)
    learned = tokenizer.decode([t for t, m in zip(example.tokens, example.targets) if m])
    assert learned == "first answer<|im_end|>\nsecond answer<|im_end|>\n"
    unmasked = encode(row, tokenizer, mask_prompt=False)
    assert sum(unmasked.targets) == len(unmasked.tokens) - 1


def test_a_batch_without_targets_gives_zero_loss_not_nan(tiny_model_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load

    from lorapipe.loss import masked_loss

    model, _ = load(str(tiny_model_dir))
    tokens = mx.array([[1, 2, 3, 4, 5]])
    loss, count = masked_loss(model, tokens, mx.zeros((1, 5)))
    assert loss.item() == 0.0 and count.item() == 0


def test_a_split_loss_covers_every_row(tiny_model_dir: Path) -> None:
    """Training drops the last partial batch; eval's test loss must not drop any row."""
    import mlx.core as mx
    from mlx_lm import load

    from lorapipe.batches import encode, make_batches
    from lorapipe.loss import dataset_loss, masked_loss

    model, tokenizer = load(str(tiny_model_dir))
    examples = [encode(row, tokenizer, mask_prompt=True) for row in make_rows(10, 3)]
    assert [len(b) for b in make_batches(examples, 4).tokens] == [4, 4]
    every = make_batches(examples, 4, every_row=True)
    assert sorted(len(b) for b in every.tokens) == [2, 4, 4]
    assert every.real_tokens == sum(len(e.tokens) for e in examples)

    total = count = 0.0
    for e in examples:  # one row at a time, no padding at all
        loss, n = masked_loss(model, mx.array([e.tokens]), mx.array([e.targets], mx.float32))
        total, count = total + loss.item() * n.item(), count + n.item()
    assert dataset_loss(model, every) == pytest.approx(total / count, rel=1e-5)


def test_validation_samples_batches_of_every_length() -> None:
    """`train.val_batches: N` scores N batches spread over the length-sorted split, the same
    ones every evaluation, not its N shortest."""
    from lorapipe.loss import spread

    picked = spread(72, 16)
    # Fixed: the middle batch of each of 16 equal strides, whatever the run or evaluation.
    assert picked == [2, 6, 11, 15, 20, 24, 29, 33, 38, 42, 47, 51, 56, 60, 65, 69]
    assert len(set(picked)) == 16 and picked == sorted(picked)
    assert picked[0] < 72 // 16 and picked[-1] >= 72 - 72 // 16  # shortest and longest strata
    assert spread(10, 10) == spread(10, 50) == spread(10, -1) == list(range(10))
    assert spread(3, 1) == [1]


def adapted_model(tiny_model_dir: Path, tied: bool, seed: int) -> tuple[Any, Any]:
    """The tiny model (its head tied to the embedding, or a separate one) with params.yaml's
    adapters, their B matrices random (B = 0 would hide A's gradient)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.models import llama

    from lorapipe.params import load_params
    from lorapipe.trainer import attach_adapters

    model, tokenizer = load(str(tiny_model_dir))
    if not tied:
        args = llama.ModelArgs.from_dict({**vars(model.args), "tie_word_embeddings": False})
        model = llama.Model(args)
    mx.random.seed(seed)
    attach_adapters(model, load_params(REPO / "params.yaml").lora)
    for name, b in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, 0.1 * mx.random.normal(b.shape))]))
    return model, tokenizer


@pytest.mark.parametrize("tied", [True, False])
def test_logits_at_learned_positions_only_keep_the_loss_and_gradients(
    tiny_model_dir: Path, tied: bool
) -> None:
    """The output layer runs on the learned positions only (Batches.positions); the loss and
    every adapter gradient are those of the full logits, with a tied or a separate head."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lorapipe.batches import encode, make_batches
    from lorapipe.loss import masked_loss

    model, tokenizer = adapted_model(tiny_model_dir, tied, seed=0)
    rows = make_rows(9, 4)
    rows[0]["messages"][2]["content"] += " and a much longer answer " * 6  # a wider batch
    examples = [encode(row, tokenizer, mask_prompt=True) for row in rows]
    batches = make_batches(examples, 4, every_row=True)
    # widths 64 and 96 of 4 rows, and the long row, left over, alone at 192
    assert [t.shape for t in batches.tokens] == [(4, 65), (4, 97), (1, 193)]
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    for i in range(len(batches)):
        tokens, targets, positions = batches.arrays(i)
        learned = targets[:, 1:].reshape(-1)
        assert positions is not None and int(learned[positions].sum()) == int(learned.sum())
        assert positions.size < targets[:, 1:].size  # prompts and padding are left out
        (full, count), full_grad = loss_and_grad(model, tokens, targets)
        (gathered, gathered_count), grad = loss_and_grad(model, tokens, targets, positions)
        assert gathered.item() == pytest.approx(full.item(), rel=1e-5)
        assert gathered_count.item() == count.item() > 0
        for (name, a), (_, b) in zip(tree_flatten(grad), tree_flatten(full_grad)):
            assert mx.allclose(a, b, rtol=1e-4, atol=1e-6).item(), name


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_cross_entropy_keeps_the_loss_and_gradients(
    tiny_model_dir: Path, tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over LOSS_CHUNK learned positions the loss runs by chunks whose logits the backward pass
    recomputes: the same loss and adapter gradients as the whole logits at once, with or
    without gathered positions, plain and compiled (as the training step runs it)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lorapipe import loss
    from lorapipe.batches import encode, make_batches

    model, tokenizer = adapted_model(tiny_model_dir, tied, seed=1)
    examples = [encode(row, tokenizer, mask_prompt=True) for row in make_rows(8, 4)]
    tokens, targets, positions = make_batches(examples, 8, every_row=True).arrays(0)
    loss_and_grad = nn.value_and_grad(model, loss.masked_loss)
    for gathered in (None, positions):
        learned = targets[:, 1:].size if gathered is None else gathered.size
        monkeypatch.setattr(loss, "LOSS_CHUNK", 10**9)
        (whole, count), whole_grad = loss_and_grad(model, tokens, targets, gathered)
        monkeypatch.setattr(loss, "LOSS_CHUNK", 7)  # several chunks, the last one short
        assert learned > 2 * loss.LOSS_CHUNK and learned % loss.LOSS_CHUNK

        def plain(*batch: mx.array | None) -> tuple[tuple[mx.array, mx.array], dict]:
            return loss_and_grad(model, *batch)

        alone, _ = loss.masked_loss(model, tokens, targets, gathered, gradient=False)
        assert alone.item() == pytest.approx(whole.item(), rel=1e-5)  # validation's way
        for run in (plain, mx.compile(plain)):
            (chunked, chunked_count), grad = run(tokens, targets, gathered)
            assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
            assert chunked_count.item() == count.item() > 0
            pairs = zip(tree_flatten(grad), tree_flatten(whole_grad), strict=True)
            for (name, a), (_, b) in pairs:
                assert mx.allclose(a, b, rtol=1e-4, atol=1e-6).item(), name


def test_chunked_cross_entropy_needs_a_frozen_head(tiny_model_dir: Path) -> None:
    """A model whose output layer trains keeps the whole logits (the chunks give the head no
    gradient)."""
    from mlx_lm import load

    from lorapipe.loss import _head_is_frozen

    model = load(str(tiny_model_dir))[0]
    model.freeze()
    assert _head_is_frozen(model)
    model.model.embed_tokens.unfreeze()
    assert not _head_is_frozen(model)


def test_positions_are_padded_to_one_count_per_width() -> None:
    """Every batch of one width gathers the same number of positions (one compiled shape per
    width, as without gathering); padding entries point at unlearned positions; a batch whose
    every position is learned gathers nothing."""
    from lorapipe.batches import Example, make_batches

    examples = [Example(list(range(1, 21)), [0] * (20 - n) + [1] * n) for n in (2, 3, 5, 9)]
    batches = make_batches(examples, 2)
    (first, second) = batches.positions
    assert first is not None and second is not None and first.size == second.size == 9 + 5
    for targets, positions in zip(batches.targets, batches.positions):
        learned = targets[:, 1:].reshape(-1)
        assert learned[positions].sum() == learned.sum()
    every = make_batches([Example([1, 2, 3], [0, 1, 1])] * 2, 2)
    assert every.positions[0] is not None  # padded to 33 wide: some positions are not learned
    full = make_batches([Example(list(range(1, 34)), [0] + [1] * 32)] * 2, 2)
    assert full.positions == [None]
