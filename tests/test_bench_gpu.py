"""benchmarks/gpu.py cannot rot before a GPU runs it: its smoke mode runs every case on the CPU with tiny models."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu  # benchmarks/gpu.py


def table(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def finite(cell: str) -> bool:
    number = float(cell.split(" ")[0])  # "0.113 (1)": seconds and the number of calls
    return math.isfinite(number) and number >= 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.md"
    assert gpu.main(["--smoke", "--out", str(out)]) == 0
    return out.read_text()


def test_the_smoke_run_writes_every_planned_case_with_finite_numbers(smoke):
    planned = [case for _, cases in gpu.plan(gpu.FAMILIES, list(gpu.DTYPES), gpu.SMOKE_BATCHES) for case in cases]
    calls = table(smoke, "| family | size | dtype | encoder | compile | batch | images/s")
    captures = table(smoke, "| family | size | dtype | views | prompts | capture pass s")
    seen = {(r[0], r[2], int(r[5]), r[3], r[4] == "on", "call") for r in calls}
    seen |= {(r[0], r[2], int(r[3]), "full", False, "capture") for r in captures}
    assert seen == {(c.family, c.dtype, c.batch, c.encoder, c.compile, c.kind) for c in planned}
    assert len(calls) + len(captures) == len(planned)
    for row in calls:
        assert row[1] == str(gpu.SMOKE_SIZE)
        numbers = [row[6], row[7], row[10], *row[11:]]  # images/s, s / call, weights, the steps
        assert all(finite(cell) for cell in numbers), row
        assert row[9] == "-"  # peak GPU memory: none on the CPU
        assert (row[8] != "-") == (row[4] == "on")  # the compiling first call is reported for compiled cases
    for row in captures:
        assert int(row[4]) >= 1 and all(finite(cell) for cell in row[5:8]), row
    assert "Skipped: none." in smoke


def test_a_spent_budget_skips_every_case_and_says_so(tmp_path):
    out = tmp_path / "gpu.md"
    assert gpu.main(["--smoke", "--budget", "0", "--families", "sd1", "--out", str(out)]) == 0
    text = out.read_text()
    planned = [c for _, cases in gpu.plan(["sd1"], list(gpu.DTYPES), gpu.SMOKE_BATCHES) for c in cases]
    assert all(f"- {case.label}: skipped, time budget" in text for case in planned)
    assert table(text, "| family | size | dtype | encoder") == []


def test_the_plan_runs_eager_cases_first_and_compiles_last():
    groups = gpu.plan(gpu.FAMILIES, list(gpu.DTYPES), gpu.BATCHES)
    compiled = [key for key, _ in groups if key[2]]
    assert [key for key, _ in groups][-len(compiled) :] == compiled == [(f, "float16", True) for f in gpu.FAMILIES]
    eager = groups[0][1]
    assert [(c.batch, c.encoder, c.kind) for c in eager] == [
        (1, "full", "call"), (4, "full", "call"), (8, "full", "call"),
        (1, "tiny", "call"), (4, "tiny", "call"), (8, "tiny", "call"), (8, "full", "capture"),
    ]  # fmt: skip
    budget = gpu.Budget(100.0)
    assert budget.guess(eager[0]) == 0.0  # nothing known yet: the first case measures
    budget.learn(eager[0], {"seconds": 2.0})
    assert budget.guess(eager[2]) == pytest.approx(16.0 + gpu.REPEAT_SECONDS + 16.0)  # 8 images at 2 s each
    assert budget.guess(gpu.Case("sd1", "bfloat16", 1)) == budget.guess(eager[0]) > 0  # the other dtype's calls
    assert budget.guess(gpu.Case("sdxl", "float16", 1)) == 0.0
    budget.builds["sd1"] = 10.0
    assert budget.group(eager[0]) == 10.0 + budget.guess(eager[0])
    assert budget.guess(gpu.Case("sd1", "float16", 4, compile=True)) == gpu.COMPILE_GUESS_S
    budget.learn(gpu.Case("sd1", "float16", 4, compile=True), {"first_call": 40.0, "seconds": 0.1})
    assert budget.guess(gpu.Case("sdxl", "float16", 4, compile=True)) == 60.0


def test_the_real_shapes_build_as_the_families_they_are_at_their_native_sizes():
    """On the meta device (no memory): what gpu.py builds on a GPU is recognised as SD 1.5, SDXL and SD3."""
    from maskdiffusion.loading import components_from_pipe

    for name, size in (("sd1", 512), ("sdxl", 1024), ("sd3", 1024)):
        pipe, built = gpu.real_pipeline(name, torch.float16, torch.device("meta"))
        components = components_from_pipe(pipe)
        assert (components.family.name, components.presets["default"].size) == (name, size)
        tensors = [t for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]  # fmt: skip
        assert {t.dtype for t in tensors} == {torch.float16}  # as a load with torch_dtype casts them
        assert built == ("without text_encoder_3 (T5-XXL)" if name == "sd3" else "real shapes")
    assert pipe.text_encoder_3 is None and pipe.text_encoder_2 is not None  # SD3: CLIP-L and bigG, no T5
