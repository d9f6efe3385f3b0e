"""The benchmark workloads are exactly those of targets.md, and the FLOP count is right (CPU)."""

import sys
from pathlib import Path

import pytest
import torch

from benchmarks.workloads import (
    HEAD_LAYOUTS,
    TARGET_LAYOUT_WORKLOADS,
    HeadLayout,
    TOTAL_TOKENS,
    WORKLOAD_NAMES,
    backward_flops,
    forward_flops,
    layouts_for,
    make_workload,
)


# Benchmark rows on CPU stand-ins: no GPU clocks (conftest.py).
pytestmark = pytest.mark.usefixtures("no_clock_sampling")


# What seed 0 gives, recorded once: a change here means benchmark numbers no longer compare.
EXPECTED_NUM_SEQUENCES = {"docs": 26, "short": 115, "equal2k": 16, "skewed": 259}
EXPECTED_SKEWED_PREFIX = (16_384, 45, 48, 118, 65)
EXPECTED_SKEWED_LAST = 51
EXPECTED_DOCS_PREFIX = (4192, 669, 101, 1585, 303)
EXPECTED_DOCS_LAST = 2409  # cut so the total is exact
EXPECTED_SHORT_LAST = 246


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_total_is_exact_and_cu_seqlens_match(name: str) -> None:
    workload = make_workload(name)
    assert sum(workload.lengths) == TOTAL_TOKENS == 32_768
    cu_seqlens = workload.cu_seqlens()
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.shape == (workload.num_sequences + 1,)
    assert cu_seqlens[0].item() == 0 and cu_seqlens[-1].item() == TOTAL_TOKENS
    assert torch.equal(cu_seqlens.diff(), torch.tensor(workload.lengths, dtype=torch.int32))
    assert workload.max_seqlen == max(workload.lengths)


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_number_of_sequences(name: str) -> None:
    assert make_workload(name).num_sequences == EXPECTED_NUM_SEQUENCES[name]


def test_docs_lengths() -> None:
    lengths = make_workload("docs").lengths
    assert lengths[: len(EXPECTED_DOCS_PREFIX)] == EXPECTED_DOCS_PREFIX
    assert lengths[-1] == EXPECTED_DOCS_LAST
    # Every drawn length is within the clip bounds; the cut last one only gets shorter.
    assert all(32 <= s <= 8192 for s in lengths[:-1])
    assert 1 <= lengths[-1] <= 8192


def test_short_lengths() -> None:
    lengths = make_workload("short").lengths
    assert all(64 <= s <= 512 for s in lengths[:-1])
    assert lengths[-1] == EXPECTED_SHORT_LAST
    # Uniform in [64, 512]: both ends are reachable and the mean is near 288.
    assert min(lengths[:-1]) < 80 and max(lengths) > 490
    assert 260 < sum(lengths) / len(lengths) < 320


def test_equal2k_lengths() -> None:
    assert make_workload("equal2k").lengths == (2048,) * 16


def test_skewed_lengths_follow_targets_md() -> None:
    # targets.md's rule written out on its own: one sequence of 16,384, then
    # torch.randint(1, 129, (1,), generator=g) per sequence (g seeded 0) up to 32,768 tokens, the
    # last one cut so the total is exact.
    generator = torch.Generator().manual_seed(0)
    expected = [16_384]
    while sum(expected) < 32_768:
        drawn = int(torch.randint(1, 129, (1,), generator=generator).item())
        expected.append(min(drawn, 32_768 - sum(expected)))
    lengths = make_workload("skewed").lengths
    assert lengths == tuple(expected)
    assert sum(lengths) == 32_768
    assert lengths[: len(EXPECTED_SKEWED_PREFIX)] == EXPECTED_SKEWED_PREFIX
    assert lengths[-1] == EXPECTED_SKEWED_LAST
    assert lengths.count(16_384) == 1 and all(1 <= s <= 128 for s in lengths[1:])
    # Uniform in [1, 128]: both ends are reachable and the mean is near 64.5.
    assert min(lengths[1:-1]) <= 2 and max(lengths[1:]) >= 126
    assert 58 < sum(lengths[1:]) / len(lengths[1:]) < 71


def test_default_rows_are_those_of_targets_md() -> None:
    # MHA and GQA at d = 128 everywhere; 32/32 at d = 64 and 8/8 at d = 256 on docs and skewed.
    assert HEAD_LAYOUTS["mha_32x64"] == HeadLayout("mha_32x64", 32, 32, 64)
    assert HEAD_LAYOUTS["mha_8x256"] == HeadLayout("mha_8x256", 8, 8, 256)
    rows = [(w, layout) for w in WORKLOAD_NAMES for layout in layouts_for(w, None)]
    assert rows == [
        ("docs", "mha"), ("docs", "gqa"), ("docs", "mha_32x64"), ("docs", "mha_8x256"),
        ("short", "mha"), ("short", "gqa"),
        ("equal2k", "mha"), ("equal2k", "gqa"),
        ("skewed", "mha"), ("skewed", "gqa"), ("skewed", "mha_32x64"), ("skewed", "mha_8x256"),
    ]
    assert set(TARGET_LAYOUT_WORKLOADS) == {layout for _, layout in rows}
    # Layouts named on the command line run on every workload, in the order given.
    assert layouts_for("short", ["mha_d96", "mha_8x256"]) == ["mha_d96", "mha_8x256"]


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_deterministic(name: str) -> None:
    # A global RNG state change must not matter: lengths use their own seeded generator.
    first = make_workload(name)
    torch.manual_seed(12345)
    torch.rand(100)
    assert make_workload(name) == first


def test_unknown_workload_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("long")


def test_forward_flops_hand_computed() -> None:
    # Sequences of 3 and 2 tokens, 2 query heads, d = 4.
    # Full: pairs 9 + 4 = 13 -> 4 * 4 * 2 * 13 = 416.
    # Causal: pairs 6 + 3 = 9 -> 4 * 4 * 2 * 9 = 288.
    assert forward_flops((3, 2), nheads_q=2, head_dim=4, causal=False) == 416
    assert forward_flops((3, 2), nheads_q=2, head_dim=4, causal=True) == 288
    assert backward_flops((3, 2), nheads_q=2, head_dim=4, causal=True) == 720.0


def test_workload_flops_use_query_heads() -> None:
    # GQA counts query heads: 32 query heads do twice the work of 16, kv heads do not matter.
    workload = make_workload("equal2k")
    mha = workload.forward_flops(HEAD_LAYOUTS["mha"], causal=False)
    gqa = workload.forward_flops(HEAD_LAYOUTS["gqa"], causal=False)
    assert mha == 4 * 128 * 16 * 16 * 2048 * 2048
    assert gqa == 2 * mha
    causal = workload.forward_flops(HEAD_LAYOUTS["mha"], causal=True)
    assert causal == 4 * 128 * 16 * 16 * (2048 * 2049 // 2)


# ----------------------------------------------------------------------------------------------
# Backward benchmark: reference gradients, the row logic on CPU stand-ins, the report columns
# ----------------------------------------------------------------------------------------------

import json  # noqa: E402
import math  # noqa: E402

import triton.testing  # noqa: E402

from benchmarks import bench_backward, checks, report  # noqa: E402
from benchmarks.impls import Case, Prepared  # noqa: E402
from benchmarks.workloads import Workload  # noqa: E402

# Lengths that do not divide the (shrunk) chunk, one shorter than a chunk, one of a single token.
TINY_LENGTHS = (5, 17, 9, 1)
TINY_LAYOUT = HeadLayout("tiny_gqa", nheads_q=4, nheads_kv=2, head_dim=16)
TINY_CHUNK_ROWS = 4
FAKE_BENCH_MS = 2.0


def _tiny_inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, dout: (total, 4, 16); k, v: (total, 2, 16); randn in `dtype` on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(TINY_LENGTHS)

    def randn(nheads: int) -> torch.Tensor:
        return torch.randn(total, nheads, TINY_LAYOUT.head_dim, generator=generator).to(dtype)

    return randn(4), randn(2), randn(2), randn(4)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradients_match_autograd(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    # The closed-form, chunked gradients equal autograd through the forward reference (float64;
    # the results are stored in float32), and the output is the forward reference's, bitwise.
    monkeypatch.setattr(checks, "QUERY_CHUNK_ROWS", TINY_CHUNK_ROWS)
    q, k, v, dout = _tiny_inputs(torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = checks.reference_attention(*leaves, TINY_LENGTHS, causal, 0.3, torch.float64)
    expected = torch.autograd.grad(out, leaves, dout)
    out_cf, *grads = checks.reference_attention_grads(
        q, k, v, dout, TINY_LENGTHS, causal, 0.3, torch.float64
    )
    assert torch.equal(out_cf, out.detach())
    for grad, want in zip(grads, expected):
        assert grad.dtype == torch.float32 and grad.shape == want.shape
        torch.testing.assert_close(grad, want.float(), rtol=1e-6, atol=1e-6)


def test_build_references_tolerances_follow_the_rule() -> None:
    q, k, v, dout = _tiny_inputs(torch.bfloat16)
    forward, backward = checks.build_references(q, k, v, dout, TINY_LENGTHS, True, 0.25)
    assert forward.tolerance == 2.0 * forward.lowp_max_abs_err + checks.TOLERANCE_FLOOR
    assert len(backward.grads) == len(checks.GRAD_NAMES) == 3
    for err, tolerance in zip(backward.lowp_max_abs_errs, backward.tolerances):
        assert err > 0  # bf16 math is not exact
        assert tolerance == 3.0 * err + checks.TOLERANCE_FLOOR
    checked = backward.check(backward.grads)
    assert all(passed and err == 0 for passed, err in checked.values())
    poisoned = (backward.grads[0], backward.grads[1], torch.full_like(backward.grads[2], math.nan))
    assert backward.check(poisoned)["dv"][0] is False


class _NoisyGradient(torch.autograd.Function):
    """Identity whose backward adds fresh noise: a stand-in for a non-reproducible backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad + 1e-4 * torch.rand_like(grad)


def _plain_preparer(noisy: bool = False, own_layout: bool = False):
    """A CPU stand-in implementation: the float32 reference with autograd. `own_layout` reads
    and returns FlexAttention's (1, nheads, total, d) layout, with copies as leaves."""

    def prepare(case: Case) -> Prepared:
        def to_packed(t: torch.Tensor) -> torch.Tensor:
            return t[0].transpose(0, 1) if own_layout else t

        def from_packed(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(0, 1).unsqueeze(0) if own_layout else t

        inputs = tuple(
            from_packed(t).contiguous().detach().requires_grad_(t.requires_grad)
            for t in (case.q, case.k, case.v)
        )

        def run() -> torch.Tensor:
            q, k, v = (to_packed(t) for t in inputs)
            out = checks.reference_attention(q, k, v, case.workload.lengths, case.causal,
                                             case.scale, torch.float32)
            if noisy:
                out = _NoisyGradient.apply(out)
            return from_packed(out.to(case.q.dtype))

        return Prepared(run, inputs, to_packed=to_packed, from_packed=from_packed)

    return prepare


def _unavailable(case: Case) -> Prepared:
    raise RuntimeError("this build has no such kernel")


def _fake_do_bench(fn, warmup: int, rep: int, return_mode: str) -> float:
    assert return_mode == "median"
    fn()
    return FAKE_BENCH_MS


def _tiny_case(causal: bool) -> Case:
    workload = Workload("tiny", TINY_LENGTHS)
    q, k, v, _ = _tiny_inputs(torch.bfloat16, seed=1)
    return Case(workload, TINY_LAYOUT, causal, q, k, v, workload.cu_seqlens())


def test_backward_row_on_cpu_stand_ins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench)
    impls = ["ours", "ours_det", "varlen_attn", "flex"]
    preparers = {
        "ours": _plain_preparer(),
        "ours_det": _plain_preparer(noisy=True),  # must be bitwise reproducible: fails
        "varlen_attn": _unavailable,
        "flex": _plain_preparer(own_layout=True),
    }
    case = _tiny_case(causal=True)
    row = bench_backward.bench_row(case, impls, preparers)

    forward, backward = row["forward"]["results"], row["backward"]["results"]
    assert set(forward) == {"ours", "varlen_attn", "flex"}  # ours_det has no forward of its own
    assert forward["ours"]["status"] == forward["flex"]["status"] == "ok"
    assert forward["varlen_attn"]["status"] == "n/a"
    assert backward["ours"]["status"] == backward["flex"]["status"] == "ok"
    assert backward["varlen_attn"]["status"] == "n/a"
    assert "no such kernel" in backward["varlen_attn"]["reason"]
    det = backward["ours_det"]
    assert det["status"] == "wrong" and not det["check"]["bitwise_repeatable"]
    assert all(det["check"][name]["passed"] for name in checks.GRAD_NAMES)

    ours = backward["ours"]
    assert ours["check"]["passed"] and ours["check"]["bitwise_repeatable"]
    flops = case.workload.backward_flops(TINY_LAYOUT, causal=True)
    assert row["backward_flops"] == flops == 2.5 * row["forward_flops"]
    assert ours["tflops"] == pytest.approx(flops / (FAKE_BENCH_MS * 1e-3) / 1e12)
    # The same math in another layout: gradients equal ours once brought back to packed.
    assert backward["flex"]["check"]["max_abs_diff_vs_ours"] == {"dq": 0.0, "dk": 0.0, "dv": 0.0}
    assert row["backward"]["ratios"] == {
        "ours/varlen_attn": None, "ours/flex": 1.0, "ours_det/ours": None,
    }
    assert set(row["reference"]["backward"]) == set(checks.GRAD_NAMES)

    meta = {"date": "today", "gpu": "cpu", "torch": "t", "triton": "t", "git_commit": "abc",
            "git_dirty": False, "command": "python benchmarks/bench_backward.py"}
    markdown_path = report.write_backward_outputs(tmp_path / "bwd.json", meta, [row], impls)
    assert json.loads((tmp_path / "bwd.json").read_text())["rows"][0]["backward_flops"] == flops
    assert markdown_path.read_text().startswith("# Backward benchmark, today\n")
    header, body = report.backward_table([row], impls)
    assert header[3:] == [
        "ours TFLOP/s fwd / bwd", "ours_det TFLOP/s fwd / bwd", "varlen_attn TFLOP/s fwd / bwd",
        "flex TFLOP/s fwd / bwd", "bwd ours/varlen_attn", "bwd ours/flex", "bwd ours_det/ours",
    ]
    fwd_ours = forward["ours"]["tflops"]
    assert body[0][3:] == [
        f"{fwd_ours:.1f} / {ours['tflops']:.1f}", "- / WRONG", "n/a / n/a",
        f"{forward['flex']['tflops']:.1f} / {backward['flex']['tflops']:.1f}", "-", "1.00", "-",
    ]
    notes = report.backward_notes([row], impls)
    assert notes[0].startswith("tiny/tiny_gqa/causal ours_det backward: WRONG, gradients differ")
    assert notes[1].startswith("tiny/tiny_gqa/causal varlen_attn forward: n/a, RuntimeError")
    assert notes[2].startswith("tiny/tiny_gqa/causal varlen_attn backward: n/a, RuntimeError")
    assert len(notes) == 3


def test_backward_notes_name_the_failing_gradient_and_a_set_up_note_once() -> None:
    grad_ok = {"max_abs_err": 0.01, "tolerance": 0.05, "passed": True}
    check = {"dq": grad_ok, "dk": {"max_abs_err": 0.5, "tolerance": 0.05, "passed": False},
             "dv": grad_ok, "bitwise_repeatable": False, "repeatable_required": False,
             "passed": False}
    noted = {"status": "ok", "tflops": 100.0, "note": "k/v repeated"}
    row = {
        "workload": "docs", "layout": "gqa", "causal": False,
        "forward": {"results": {"ours": {"status": "ok", "tflops": 300.0},
                                "varlen_attn": noted}, "ratios": {}},
        "backward": {"results": {"ours": {"status": "wrong", "check": check},
                                 "varlen_attn": {**noted, "tflops": 80.0}}, "ratios": {}},
    }
    assert report.backward_notes([row], ["ours", "varlen_attn"]) == [
        "docs/gqa/full ours backward: WRONG, dk max abs error 0.5 > tolerance 0.05; not timed",
        "docs/gqa/full varlen_attn*: k/v repeated",
    ]
    _, body = report.backward_table([row], ["ours", "varlen_attn"])
    assert body == [["docs", "gqa", "no", "300.0 / WRONG", "100.0* / 80.0*", "-"]]


def test_speed_ratios_need_both_sides_timed() -> None:
    results = {"ours": {"status": "ok", "tflops": 300.0},
               "ours_det": {"status": "ok", "tflops": 240.0},
               "flex": {"status": "n/a", "reason": "x"}}
    assert report.speed_ratios(results, report.BACKWARD_RATIO_PAIRS) == {
        "ours/flex": None, "ours_det/ours": pytest.approx(0.8),
    }
    assert report.speed_ratios({"ours": results["ours"]}, report.FORWARD_RATIO_PAIRS) == {}


def test_forward_row_and_table_on_cpu_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    # The forward benchmark's row and table, through the pieces the backward benchmark reuses.
    from benchmarks import bench_forward

    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench)
    impls = ["ours", "varlen_attn", "flex"]
    preparers = {"ours": _plain_preparer(), "varlen_attn": _unavailable,
                 "flex": _plain_preparer(own_layout=True)}
    row = bench_forward.bench_row(_tiny_case(causal=False), impls, preparers)
    assert row["results"]["ours"]["status"] == row["results"]["flex"]["status"] == "ok"
    assert row["results"]["flex"]["check"]["max_abs_diff_vs_ours"] == 0.0
    assert row["ratios"] == {"ours/varlen_attn": None, "ours/flex": 1.0}
    header, body = report.table([row], impls)
    tflops = f"{row['results']['ours']['tflops']:.1f}"
    assert header[3:] == ["ours TFLOP/s", "varlen_attn TFLOP/s", "flex TFLOP/s", "ours/varlen_attn",
                          "ours/flex"]
    assert body == [["tiny", "tiny_gqa", "no", tflops, "n/a", tflops, "-", "1.00"]]
    assert report.notes([row], impls) == [
        "tiny/tiny_gqa/full varlen_attn: n/a, RuntimeError: this build has no such kernel"
    ]


# ----------------------------------------------------------------------------------------------
# Forward benchmark: kernel families, the FA4 peer, the dense ceiling and the target columns
# ----------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import types  # noqa: E402

from benchmarks import bench_forward, impls, timing_rounds  # noqa: E402

OVERRIDE = impls.FAMILY_OVERRIDE_VARIABLE


def test_families_option_is_parsed_in_order_without_repeats() -> None:
    assert bench_forward.family_list("auto,sm80,sm90") == ["auto", "sm80", "sm90"]
    assert bench_forward.family_list(" sm90 , auto,sm90") == ["sm90", "auto"]
    for bad in ("", "sm80,,auto", "sm-80", "auto;sm80"):
        with pytest.raises(argparse.ArgumentTypeError, match="kernel family names"):
            bench_forward.family_list(bad)
    args = bench_forward.parse_args(["--out", "x.json", "--families", "sm90,auto"])
    assert args.families == ["sm90", "auto"]
    defaults = bench_forward.parse_args(["--out", "x.json"])
    assert defaults.families is None and defaults.layouts is None
    assert defaults.impl == ["ours", "varlen_attn", "flex", "fa4"]
    assert defaults.workloads == ["docs", "short", "equal2k", "skewed"]
    with pytest.raises(SystemExit):
        bench_forward.parse_args(["--out", "x.json", "--families", "sm 80"])


def test_ours_is_timed_once_per_family() -> None:
    expanded = impls.with_families(["ours", "varlen_attn", "flex", "fa4"], ["auto", "sm80", "sm90"])
    assert expanded == ["ours", "ours_sm80", "ours_sm90", "varlen_attn", "flex", "fa4"]
    assert impls.with_families(["varlen_attn"], ["sm80"]) == ["varlen_attn"]
    preparers = impls.ours_family_preparers(["auto", "sm90"])
    case = _tiny_case(causal=False)
    # Forced families carry the override; auto leaves the environment as it is.
    assert preparers["ours"](case).environment == {}
    assert preparers["ours_sm90"](case).environment == {OVERRIDE: "sm90"}


def _fake_extension(built_for: dict[str, list[int]]) -> types.SimpleNamespace:
    """A stand-in for flash_varlen's compiled module: kernel_families() only."""
    families = [{"name": name, "built_for": caps} for name, caps in built_for.items()]
    return types.SimpleNamespace(kernel_families=lambda: families)


def test_default_families_are_those_built_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    extension = _fake_extension({"sm90": [90], "sm80": [80, 90], "sm100": [100]})
    assert bench_forward.resolve_families(None, extension) == (["auto", "sm90", "sm80"], None)
    assert bench_forward.resolve_families(["sm80"], extension) == (["sm80"], None)
    families, error = bench_forward.resolve_families(["auto", "sm70"], extension)
    assert error == ("--families: sm70 is no kernel family of this build; "
                     "known: auto,sm90,sm80,sm100")
    # Without the extension nothing can be checked: auto by default, else as asked.
    assert bench_forward.resolve_families(None, None) == (["auto"], None)
    assert bench_forward.resolve_families(["sm90"], None) == (["sm90"], None)


def test_environment_is_restored_however_the_block_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE, "sm80")
    with impls.environment_set({OVERRIDE: "sm90"}):
        assert os.environ[OVERRIDE] == "sm90"
    assert os.environ[OVERRIDE] == "sm80"
    monkeypatch.delenv(OVERRIDE)
    with pytest.raises(RuntimeError):
        with impls.environment_set({OVERRIDE: "sm90"}):
            raise RuntimeError("a failing call")
    assert OVERRIDE not in os.environ


def _family_preparer(family: str, serves: bool):
    """A CPU stand-in of ours forced to `family`: the reference when the override names the family
    at call time (so it must be set during the warm-up, check and timing), NotImplementedError
    when it does not serve the case."""
    plain = _plain_preparer()

    def prepare(case: Case) -> Prepared:
        prepared = plain(case)

        def run() -> torch.Tensor:
            assert os.environ.get(OVERRIDE) == family
            if not serves:
                raise NotImplementedError(f"no {family} kernel for this head dim")
            return prepared.run()

        return Prepared(run, prepared.inputs, environment={OVERRIDE: family})

    return prepare


def _fake_fa4(returns_lse: bool, error: float = 0.0) -> types.SimpleNamespace:
    """A stand-in for flash_attn.cute: the float32 reference (plus `error`), returned as out or
    (out, lse); it checks that the call passes the packed batch as FA4's keywords and records
    each call's `deterministic` in `deterministic_calls`."""
    deterministic_calls: list[bool] = []

    def flash_attn_varlen_func(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale, causal, deterministic):
        deterministic_calls.append(deterministic)
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        lengths = tuple(cu_seqlens_q.diff().tolist())
        assert max_seqlen_q == max_seqlen_k == max(lengths)
        out = checks.reference_attention(q, k, v, lengths, causal, softmax_scale, torch.float32)
        out = (out + error).to(q.dtype)
        return (out, torch.zeros(q.shape[1], q.shape[0])) if returns_lse else out

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func,
                                 deterministic_calls=deterministic_calls)


@pytest.mark.parametrize("returns_lse", [False, True])
def test_forward_row_with_families_and_fa4(monkeypatch: pytest.MonkeyPatch,
                                           returns_lse: bool) -> None:
    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench)
    monkeypatch.setitem(sys.modules, impls.FA4_MODULE, _fake_fa4(returns_lse))
    monkeypatch.delenv(OVERRIDE, raising=False)
    names = ["ours", "ours_sm80", "ours_sm90", "varlen_attn", "fa4"]
    preparers = {"ours": _plain_preparer(), "ours_sm80": _family_preparer("sm80", serves=True),
                 "ours_sm90": _family_preparer("sm90", serves=False),
                 "varlen_attn": _unavailable, "fa4": impls.prepare_fa4}
    row = bench_forward.bench_row(_tiny_case(causal=True), names, preparers)
    assert OVERRIDE not in os.environ  # restored after every implementation
    results = row["results"]
    assert [results[name]["status"] for name in names] == [
        "ok", "ok", report.UNSUPPORTED, "n/a", "ok"]
    assert "no sm90 kernel" in results["ours_sm90"]["reason"]
    # FA4's output is checked like any other and compared with ours.
    assert results["fa4"]["check"]["passed"]
    assert results["fa4"]["check"]["max_abs_diff_vs_ours"] == 0.0
    assert row["ratios"] == {
        "ours/varlen_attn": None, "ours/fa4": 1.0, "ours_sm80/varlen_attn": None,
        "ours_sm80/fa4": 1.0, "ours_sm90/varlen_attn": None, "ours_sm90/fa4": None,
    }
    # A dense rate at which 1.1 x FA4 is half of it: the 1.1x target applies.
    fa4_tflops = results["fa4"]["tflops"]
    row["ours_family"] = "sm80"
    header, body = report.table([row], names, dense_tflops=2.2 * fa4_tflops)
    assert header[3:] == [
        "ours family", "ours TFLOP/s", "ours_sm80 TFLOP/s", "ours_sm90 TFLOP/s",
        "varlen_attn TFLOP/s", "fa4 TFLOP/s", "ours/varlen_attn", "ours/fa4", "ours_sm80/fa4",
        "ours_sm90/fa4", "1.1x fa4 / dense", "target ours/fa4",
    ]
    cell = f"{fa4_tflops:.1f}"
    assert body == [["tiny", "tiny_gqa", "yes", "sm80", cell, cell, "—", "n/a", cell, "-",
                     "1.00", "1.00", "-", "50%", "1.10"]]
    assert report.notes([row], names) == [
        "tiny/tiny_gqa/causal ours_sm90: — (unsupported), NotImplementedError: no sm90 kernel "
        "for this head dim",
        "tiny/tiny_gqa/causal varlen_attn: n/a, RuntimeError: this build has no such kernel",
    ]


def test_a_wrong_fa4_is_noticed_and_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench)
    monkeypatch.setitem(sys.modules, impls.FA4_MODULE, _fake_fa4(returns_lse=True, error=0.5))
    row = bench_forward.bench_row(_tiny_case(causal=False), ["fa4"], {"fa4": impls.prepare_fa4})
    assert row["results"]["fa4"]["status"] == "wrong"
    assert "tflops" not in row["results"]["fa4"]


def test_fa4_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, impls.FA4_MODULE, _fake_fa4(returns_lse=False))
    assert impls.fa4_import_error() is None
    monkeypatch.setitem(sys.modules, impls.FA4_MODULE, None)  # what a missing module raises
    assert isinstance(impls.fa4_import_error(), ImportError)


def test_backward_row_with_fa4_and_its_deterministic_backward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench)
    fake = _fake_fa4(returns_lse=True)
    monkeypatch.setitem(sys.modules, impls.FA4_MODULE, fake)
    names = ["ours", "ours_det", "fa4", "fa4_det"]
    preparers = {"ours": _plain_preparer(), "ours_det": _plain_preparer(),
                 "fa4": impls.prepare_fa4, "fa4_det": impls.prepare_fa4_deterministic}
    row = bench_backward.bench_row(_tiny_case(causal=True), names, preparers)

    forward, backward = row["forward"]["results"], row["backward"]["results"]
    assert set(forward) == {"ours", "fa4"}  # the deterministic columns time no forward
    assert forward["fa4"]["status"] == "ok"
    assert [backward[name]["status"] for name in names] == ["ok"] * 4
    det = backward["fa4_det"]
    assert det["check"]["repeatable_required"] and det["check"]["bitwise_repeatable"]
    assert not backward["fa4"]["check"]["repeatable_required"]
    # Backward timings run in rounds too (timing_rounds.py).
    assert backward["fa4_det"]["time_ms_rounds"] == [FAKE_BENCH_MS] * timing_rounds.TIMING_ROUNDS
    # The fa4_det calls pass deterministic=True (FA4's flag changes only its backward).
    assert True in fake.deterministic_calls and False in fake.deterministic_calls
    ratios = row["backward"]["ratios"]
    assert {"ours/fa4", "fa4_det/fa4", "ours_det/fa4_det", "ours_det/ours"} <= set(ratios)
    assert ratios["fa4_det/fa4"] == pytest.approx(1.0)
    header, _ = report.backward_table([row], names)
    assert header[-4:] == ["bwd ours/fa4", "bwd ours_det/ours", "bwd fa4_det/fa4",
                           "bwd ours_det/fa4_det"]


def test_the_benchmarks_drop_fa4_columns_when_fa4_does_not_import(
        monkeypatch: pytest.MonkeyPatch) -> None:
    meta: dict = {}
    monkeypatch.setitem(sys.modules, impls.FA4_MODULE, None)  # what a missing module raises
    kept = bench_forward.without_missing_fa4(["ours", "fa4", "ours_det", "fa4_det"], meta)
    assert kept == ["ours", "ours_det"]
    assert set(meta["skipped"]) == {"fa4", "fa4_det"}
    assert "does not import" in meta["skipped"]["fa4_det"]
    assert report.run_notes(meta)[0].startswith("fa4 skipped: flash_attn.cute does not import")

    monkeypatch.setitem(sys.modules, impls.FA4_MODULE, _fake_fa4(returns_lse=False))
    meta = {}
    assert bench_forward.without_missing_fa4(["ours", "fa4_det"], meta) == ["ours", "fa4_det"]
    assert meta == {}


def _fa4_row(workload: str, fa4: dict) -> dict:
    return {"workload": workload, "layout": "mha", "causal": False, "results": {"fa4": fa4},
            "ratios": {}}


def test_fa4_target_follows_targets_md() -> None:
    dense = 800.0
    # 1.1 x 500 = 550 is 69% of the dense rate: under 95%, so 1.1x FA4 is required.
    assert report.fa4_target(_fa4_row("docs", _result_ok(500.0)), dense) == (
        pytest.approx(0.6875), 1.1)
    # 1.1 x 700 = 770 is 96%: only "at least FA4" remains.
    assert report.fa4_target(_fa4_row("docs", _result_ok(700.0)), dense)[1] == 1.0
    # Exactly 95% is not under it.
    at_ceiling = 0.95 * dense / 1.1
    assert report.fa4_target(_fa4_row("equal2k", _result_ok(at_ceiling)), dense)[1] == 1.0
    # short: 1.5x FA4.
    assert report.fa4_target(_fa4_row("short", _result_ok(250.0)), dense)[1] == 1.5
    # Nothing to say without FA4's time or the dense rate.
    assert report.fa4_target(_fa4_row("docs", {"status": "n/a", "reason": "x"}), dense) is None
    assert report.fa4_target(_fa4_row("docs", _result_ok(500.0)), None) is None


def _result_ok(tflops: float) -> dict:
    return {"status": "ok", "tflops": tflops}


def test_dense_matmul_rate_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_do_bench(fn, warmup: int, rep: int, return_mode: str) -> float:
        calls.append(fn())
        return FAKE_BENCH_MS

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    dense = bench_forward.dense_matmul_rate("cpu", size=4)
    assert dense == {"op": "torch.mm", "dtype": "bfloat16", "m_n_k": [4, 4, 4],
                     "time_ms": FAKE_BENCH_MS,
                     "tflops": pytest.approx(2 * 4**3 / (FAKE_BENCH_MS * 1e-3) / 1e12)}
    assert calls[0].shape == (4, 4) and calls[0].dtype == torch.bfloat16
    assert report.dense_line(dense).startswith(
        "dense bfloat16 matrix product (torch.mm, 4 x 4 x 4): 0.0 TFLOP/s (2.000 ms, median)")


def test_forward_outputs_keep_the_ceiling_and_the_skipped_peer(tmp_path: Path) -> None:
    meta = {"date": "today", "gpu": "cpu", "torch": "t", "triton": "t", "git_commit": "abc",
            "git_dirty": False, "command": "python benchmarks/bench_forward.py",
            "dense_matmul": {"op": "torch.mm", "dtype": "bfloat16", "m_n_k": [8192] * 3,
                             "time_ms": 1.4, "tflops": 785.4},
            "skipped": {"fa4": "flash_attn.cute does not import (ModuleNotFoundError: x)"},
            "family_override_in_environment": "sm80"}
    row = {**_fa4_row("docs", _result_ok(500.0)), "results": {"ours": _result_ok(400.0)}}
    markdown = report.write_outputs(tmp_path / "fwd.json", meta, [row], ["ours"]).read_text()
    dense = "- dense bfloat16 matrix product (torch.mm, 8192 x 8192 x 8192): 785.4 TFLOP/s"
    assert dense in markdown
    assert "- fa4 skipped: flash_attn.cute does not import (ModuleNotFoundError: x)" in markdown
    assert f"- {OVERRIDE}=sm80 was set for the whole run: 'ours' ran that family" in markdown
    saved = json.loads((tmp_path / "fwd.json").read_text())
    assert saved["dense_matmul"]["tflops"] == 785.4
    assert saved["rows"][0]["results"] == row["results"]


def test_rows_are_checked_first_then_timed_in_rotating_rounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_forward.bench_row: every implementation's check before any timing, then
    timing_rounds.TIMING_ROUNDS rounds with the first implementation rotating; the row reports
    the median round and all of them."""
    log: list[tuple[str, str]] = []
    timing = [False]

    def logged(name: str):
        plain = _plain_preparer()

        def prepare(case: Case) -> Prepared:
            prepared = plain(case)
            inner = prepared.run

            def run() -> torch.Tensor:
                log.append(("bench" if timing[0] else "check", name))
                return inner()

            return dataclasses.replace(prepared, run=run)

        return prepare

    bench_times = iter([3.0, 6.0, 5.0, 1.0, 2.0, 4.0])  # in call order

    def fake_do_bench(fn, warmup, rep, return_mode):
        timing[0] = True
        fn()
        timing[0] = False
        return next(bench_times)

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    row = bench_forward.bench_row(_tiny_case(causal=False), ["ours", "flex"],
                                  {"ours": logged("ours"), "flex": logged("flex")})
    kinds = [kind for kind, _ in log]
    assert kinds.count("check") >= 4  # a warm-up and a checked call each
    assert all(kind == "check" for kind in kinds[:kinds.index("bench")])
    assert [name for kind, name in log if kind == "bench"] == [
        "ours", "flex", "flex", "ours", "ours", "flex"]
    assert timing_rounds.TIMING_ROUNDS == 3
    ours, flex = row["results"]["ours"], row["results"]["flex"]
    assert ours["time_ms_rounds"] == [3.0, 1.0, 2.0] and ours["time_ms"] == 2.0
    assert flex["time_ms_rounds"] == [6.0, 5.0, 4.0] and flex["time_ms"] == 5.0
    assert ours["status"] == flex["status"] == "ok"
    assert row["ratios"]["ours/flex"] == pytest.approx(2.5)
