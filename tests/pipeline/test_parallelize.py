"""The compiled model or blocks (pipeline.parallelize.compile_model) give the eager model's
gradients, also under CUDA graphs with gradient accumulation, where the backward graph's output
pool is replayed over between micro steps, by either way of copying gradients out of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config_load import load
from pipeline.parallelize import _own_grads, compile_model, parallelize
from walsh.layers.hadamard import run_by_parent
from walsh.models import WalshLM
from walsh.models.presets import get_preset


def _accumulated_grads(model: WalshLM, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Two optimizer steps' worth of micro steps, gradients summed over each step's micro
    steps; returns the second step's gradients (the first also warms up and records graphs)."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        for b in batches:
            model(b[:, :-1], b[:, 1:]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["model", "blocks"])
@pytest.mark.parametrize("mode,grad_copy", [(None, "param"), ("reduce-overhead", "param"),
                                            ("reduce-overhead", "pass")])
def test_compiled_model_accumulates_the_eager_gradients(mode, grad_copy, scope):
    torch.manual_seed(0)
    # float weights (not ternary): a compiled absmean may round the scale differently and flip
    # a code, which is not what this test is about
    cfg = get_preset("tiny", vocab_size=512, ternary=False)
    eager = WalshLM(cfg).cuda()
    compiled = WalshLM(cfg).cuda()
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, mode, grad_copy, scope)
    # fresh batches per micro step: a stale pool would show as the wrong sum
    batches = [torch.randint(0, cfg.vocab_size, (2, 33), device="cuda") for _ in range(3)]
    want = _accumulated_grads(eager, batches)
    got = _accumulated_grads(compiled, batches)
    for (name, _), g, w in zip(eager.named_parameters(), got, want):
        err = ((g - w).norm() / w.norm().clamp(min=1e-12)).item()
        # fp32: compiled kernels reorder sums only
        assert err < 1e-4, (name, mode, grad_copy, scope, err)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("group,fuse", [(True, True), (True, False), (False, True),
                                        (False, False)])
def test_zero3_leaf_modules_are_the_blocks(stage, group, fuse):
    """At ZeRO-3 each transformer block is a DeepSpeed leaf module (gathered and released
    whole, its compiled forward free of ZeRO-3's hooks), and nothing else; every module that
    runs its children's Walsh layers inside an op of its own (attention with q, k, v grouped,
    the MLP with gate, up grouped and silu(gate) * up in the down projection) lies inside one,
    so that the leaf's gather covers the parameters it reads. No leaves at other stages."""
    pytest.importorskip("triton")
    cfg = load(Path(__file__).parents[2] / "configs/train/cpu-smoke.yaml", [
        f"train.zero_stage={stage}", "train.compile=false", "model.preset=tiny",
        "model.overrides.algebra=walsh", "model.overrides.algebra_dim=4",
        "model.overrides.walsh_impl=triton", f"model.overrides.walsh_group={group}",
        f"model.overrides.walsh_swiglu={fuse}"])
    model = parallelize(WalshLM(cfg.walsh_config()), cfg, torch.device("cpu"))
    leaves = {n for n, m in model.named_modules() if getattr(m, "_z3_leaf", False)}
    blocks = {f"blocks.{i}" for i in range(len(model.blocks))}
    assert leaves == (blocks if stage == 3 else set())
    parents = {n for n, m in model.named_modules() if any(map(run_by_parent, m.children()))}
    # attention runs q, k, v by its op when grouped; the MLP runs gate, up when grouped, and
    # down when the product is inside
    assert len(parents) == len(blocks) * (group + (group or fuse))
    assert all(n.rsplit(".", 1)[0] in blocks for n in parents), parents


@pytest.mark.parametrize("grad_copy", [None, "param", "pass"])
def test_parallelize_copies_gradients_by_config(grad_copy):
    """``train.grad_copy`` reaches ``_own_grads`` under CUDA-graph compile modes ("pass" when
    unset), and no copy is registered without them."""
    path = Path(__file__).parents[2] / "configs/train/cpu-smoke.yaml"
    over = ["train.compile=true", "model.preset=tiny"]
    over += [f"train.grad_copy={grad_copy}"] if grad_copy else []
    for mode, want in (("reduce-overhead", grad_copy or "pass"), ("default", None)):
        cfg = load(path, [*over, "train.zero_stage=0", f"train.compile_mode={mode}"])
        model = parallelize(WalshLM(cfg.walsh_config()), cfg, torch.device("cpu"))
        assert getattr(model, "_walsh_own_grads", None) == want, mode


def test_grad_copy_config_names_the_key():
    path = Path(__file__).parents[2] / "configs/train/cpu-smoke.yaml"
    with pytest.raises(ValueError, match="train.grad_copy"):
        load(path, ["train.grad_copy=params"])


def test_compile_model_refuses_an_unknown_grad_copy_or_scope():
    model = WalshLM(get_preset("tiny", vocab_size=64))
    with pytest.raises(ValueError, match="grad_copy='params'"):
        compile_model(model, "reduce-overhead", grad_copy="params")
    with pytest.raises(ValueError, match="scope='layers'"):
        compile_model(model, "reduce-overhead", scope="layers")


@pytest.mark.parametrize("stage,want", [(0, "model"), (2, "blocks"), (3, "blocks")])
def test_parallelize_compiles_by_scope(stage, want):
    """``train.compile_scope`` "auto": the whole forward at ZeRO-0 (the model's forward is the
    compiled wrapper), each block's and the loss head's at ZeRO 1-3 (the model's is not)."""
    path = Path(__file__).parents[2] / "configs/train/cpu-smoke.yaml"
    cfg = load(path, ["train.compile=true", "model.preset=tiny", f"train.zero_stage={stage}"])
    model = parallelize(WalshLM(cfg.walsh_config()), cfg, torch.device("cpu"))
    compiled = {n for n, f in (("forward", model.forward), ("head_loss", model.head_loss),
                               ("block", model.blocks[0].forward))
                if hasattr(f, "_torchdynamo_orig_callable")}
    assert compiled == ({"forward"} if want == "model" else {"head_loss", "block"})


def test_own_grads_by_pass_copies_first_gradients_once_per_pass():
    """``_own_grads(model, "pass")`` (CPU, eager: what it does to .grad, not the CUDA graphs
    it is for): after each step's first backward pass every gradient autograd stored is a view
    of one fresh buffer, equal to the plain model's bit for bit, as are the sums over later
    micro steps and optimizer steps; a gradient another hook replaced stays that hook's; a pass
    that raised midway leaves nothing that stops the next pass's copy."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order in both models: exact comparisons
    try:
        cfg = get_preset("tiny", vocab_size=128, algebra="walsh", algebra_dim=4,
                         walsh_impl="dense")
        plain, owned = WalshLM(cfg), WalshLM(cfg)
        owned.load_state_dict(plain.state_dict())
        _own_grads(owned, "pass")
        _own_grads(owned, "pass")  # registered once
        with pytest.raises(ValueError, match="already copied by 'pass'"):
            _own_grads(owned, "param")
        # a later hook that puts the gradient elsewhere, as DeepSpeed's reduction does
        taken = owned.blocks[0].mlp.down.weight
        taken.register_post_accumulate_grad_hook(
            lambda p: setattr(p, "grad", p.grad.clone()))
        names = [n for n, _ in owned.named_parameters()]

        # a pass that raises midway: its callback never runs
        boom = {"left": 1}

        def raise_once(g):
            if boom["left"]:
                boom["left"] -= 1
                raise RuntimeError("boom")
            return g

        handle = owned.blocks[-1].norm1.weight.register_hook(raise_once)
        tok = torch.randint(0, cfg.vocab_size, (2, 17))
        with pytest.raises(RuntimeError, match="boom"):
            owned(tok[:, :-1], tok[:, 1:]).backward()
        handle.remove()

        opt_p = torch.optim.SGD(plain.parameters(), lr=0.1)
        opt_o = torch.optim.SGD(owned.parameters(), lr=0.1)
        for _ in range(2):  # optimizer steps
            opt_p.zero_grad(set_to_none=True)
            opt_o.zero_grad(set_to_none=True)
            for micro in range(3):
                tok = torch.randint(0, cfg.vocab_size, (2, 17))
                for m in (plain, owned):
                    m(tok[:, :-1], tok[:, 1:]).backward()
                if micro == 0:
                    storages = {p.grad.untyped_storage().data_ptr()
                                for p in owned.parameters() if p is not taken}
                    assert len(storages) == 1, len(storages)
                    assert taken.grad.untyped_storage().data_ptr() not in storages
                for n, p, q in zip(names, plain.parameters(), owned.parameters()):
                    assert torch.equal(p.grad, q.grad), (n, micro)
            opt_p.step()
            opt_o.step()
    finally:
        torch.set_num_threads(threads)


class _Odd(nn.Module):
    """Parameters of two dtypes and one stored transposed, whose gradient autograd keeps
    non-contiguous (its strides follow ``c``'s, which match the parameter's)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(5, 3))
        self.b = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.t = nn.Parameter(torch.randn(4, 5).t())  # [5, 4], strides (1, 5)
        self.c = torch.randn(4, 5).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, 5]
        z = ((x @ self.a).double() @ self.b).float()     # [n, 4]
        return z.square().sum() + (self.t * self.c).sum() * x.sum()


def test_own_grads_by_pass_dtypes_strides_and_held_gradients():
    """By dtype one buffer each; a non-contiguous gradient cloned with its strides; every
    gradient copied (not the tensor the hooks saw) and bit-equal to the plain module's; a
    gradient a later hook holds (DeepSpeed's buckets) stays the same tensor object."""
    torch.manual_seed(0)
    plain = _Odd()
    owned = _Odd()
    owned.load_state_dict(plain.state_dict())
    owned.c = plain.c
    _own_grads(owned, "pass")
    seen, held = {}, []
    for name, p in owned.named_parameters():
        p.register_hook(lambda g, name=name: seen.__setitem__(name, g.data_ptr()))
    owned.a.register_post_accumulate_grad_hook(lambda p: held.append(p.grad))
    for step in range(2):
        x = torch.randn(7, 5)
        for m in (plain, owned):
            m(x).backward()
        if step == 0:
            a, b, t = owned.a.grad, owned.b.grad, owned.t.grad
            assert held[0] is a  # the tensor the hook kept is the one the optimizer reads
            assert (a.dtype, b.dtype) == (torch.float32, torch.float64)
            assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
            assert t.stride() == (1, 5) and not t.is_contiguous()
            for name, g in (("a", a), ("b", b), ("t", t)):
                assert g.data_ptr() != seen[name], name  # a copy, not autograd's tensor
        for name, p in plain.named_parameters():
            assert torch.equal(p.grad, getattr(owned, name).grad), (name, step)
