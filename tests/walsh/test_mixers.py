"""Head mixers: CayleyDicksonMixer and WalshMixer (MODEL_SPEC section 5)."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_err

from walsh.algebra import hadamard_matrix, layer_sign_matrix
from walsh.layers import CayleyDicksonMixer, WalshMixer

# (n_head, head_dim, group): odd head dims included; more than one group per token where possible.
MIX_CASES = [(8, 5, 2), (8, 3, 4), (8, 6, 8), (16, 3, 16)]






def make_mixer(kind: str, n_head: int, head_dim: int, group: int, ternary: bool = False):
    if kind == "cd":
        return CayleyDicksonMixer(n_head, head_dim, group, ternary=ternary)
    return WalshMixer(n_head, head_dim, group, ternary=ternary)


def randomize(mixer) -> None:
    params = [mixer.weight] if isinstance(mixer, CayleyDicksonMixer) else [mixer.weight]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def cd_mixer_ref(mixer: CayleyDicksonMixer, o: torch.Tensor) -> torch.Tensor:
    """m_i = sum_j S[i, j] O_j M_{i^j} with M_k = the (effective) weight[k], naive loops."""
    a = mixer.group
    s = layer_sign_matrix(a)
    m = mixer.effective_weight().detach()  # M_k, [A, D, D]
    b, t, h, d = o.shape
    og = o.reshape(b, t, h // a, a, d)
    out = torch.zeros_like(og)
    for i in range(a):
        for j in range(a):
            out[..., i, :] += s[i, j] * (og[..., j, :] @ m[i ^ j])
    return out.reshape(b, t, h, d)


def walsh_mixer_ref(mixer: WalshMixer, o: torch.Tensor) -> torch.Tensor:
    """Transform across the heads of a group, multiply head g by M_g, transform back."""
    a = mixer.group
    hm = hadamard_matrix(a)
    m = mixer.effective_weight().detach()
    b, t, h, d = o.shape
    og = o.reshape(b, t, h // a, a, d)
    u = torch.einsum("gk,btnkd->btngd", hm, og)
    y = torch.stack([u[..., g, :] @ m[g] for g in range(a)], dim=-2)
    z = torch.einsum("gk,btnkd->btngd", hm, y)
    return z.reshape(b, t, h, d)


@pytest.mark.parametrize("kind", ("cd", "walsh"))
@pytest.mark.parametrize("n_head,head_dim,group", MIX_CASES)
def test_identity_at_init(kind, n_head, head_dim, group, gen):
    """Full-precision mixers are the identity at init on [B, T, H, D] (rel < 1e-6)."""
    mixer = make_mixer(kind, n_head, head_dim, group)
    o = torch.randn(2, 3, n_head, head_dim, generator=gen)
    with torch.no_grad():
        out = mixer(o)
    assert out.shape == o.shape
    assert rel_err(out, o) < 1e-6


def test_cd_mixer_init_weights():
    """CD mixer init: M_0 = I and every other component 0 (exact)."""
    mixer = CayleyDicksonMixer(8, 5, 4)
    w = mixer.weight
    assert torch.equal(w[0], torch.eye(5))
    assert torch.equal(w[1:], torch.zeros(3, 5, 5))
    walsh = WalshMixer(8, 5, 4)
    assert torch.equal(walsh.weight, torch.eye(5).expand(4, 5, 5))


@pytest.mark.parametrize("kind", ("cd", "walsh"))
@pytest.mark.parametrize("n_head,head_dim,group", [(8, 5, 2), (8, 6, 8)])
def test_ternary_mixer_identity_at_init(kind, n_head, head_dim, group, gen):
    """Ternary mixers (an option) must also start as a no-op: MODEL_SPEC section 5."""
    mixer = make_mixer(kind, n_head, head_dim, group, ternary=True)
    o = torch.randn(2, 3, n_head, head_dim, generator=gen)
    with torch.no_grad():
        out = mixer(o)
    assert rel_err(out, o) < 1e-6, f"out/in RMS = {(out.norm() / o.norm()).item():.4g}"


@pytest.mark.parametrize("kind", ("cd", "walsh"))
@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("n_head,head_dim,group", MIX_CASES)
def test_mixer_matches_spec(kind, n_head, head_dim, group, ternary, gen):
    """After randomizing, the CD mixer equals m_i = sum_j S[i,j] O_j M_{i^j} and the Walsh
    mixer equals transform / per-head multiply / transform (rel < 1e-5)."""
    ref = {"cd": cd_mixer_ref, "walsh": walsh_mixer_ref}[kind]
    mixer = make_mixer(kind, n_head, head_dim, group, ternary=ternary)
    randomize(mixer)
    o = torch.randn(2, 3, n_head, head_dim, generator=gen)
    with torch.no_grad():
        out = mixer(o)
        assert rel_err(out, ref(mixer, o)) < 1e-5
        assert rel_err(out, o) > 1e-2  # really mixing


@pytest.mark.parametrize("kind", ("cd", "walsh"))
@pytest.mark.parametrize("n_head,head_dim,group", [(8, 5, 4), (8, 3, 8)])
def test_mixer_is_per_token(kind, n_head, head_dim, group, gen):
    """Perturbing token t changes no output at any other (batch, time) position (exact)."""
    mixer = make_mixer(kind, n_head, head_dim, group)
    randomize(mixer)
    o = torch.randn(2, 5, n_head, head_dim, generator=gen)
    o2 = o.clone()
    o2[1, 2] += torch.randn(n_head, head_dim, generator=gen)
    with torch.no_grad():
        out, out2 = mixer(o), mixer(o2)
    other = torch.ones(2, 5, dtype=torch.bool)
    other[1, 2] = False
    assert torch.equal(out[other], out2[other])
    assert not torch.equal(out[1, 2], out2[1, 2])


@pytest.mark.parametrize("kind", ("cd", "walsh"))
def test_mixer_groups_are_independent(kind, gen):
    """Heads mix only inside their own group of A consecutive heads."""
    mixer = make_mixer(kind, 8, 4, 4)
    randomize(mixer)
    o = torch.randn(1, 2, 8, 4, generator=gen)
    o2 = o.clone()
    o2[:, :, 5] += 1.0  # a head of the second group
    with torch.no_grad():
        out, out2 = mixer(o), mixer(o2)
    assert torch.equal(out[:, :, :4], out2[:, :, :4])
    assert not torch.equal(out[:, :, 4:], out2[:, :, 4:])


@pytest.mark.parametrize("kind", ("cd", "walsh"))
@pytest.mark.parametrize("n_head,group", [(6, 4), (12, 8), (4, 8), (8, 16)])
def test_indivisible_heads_raise(kind, n_head, group):
    """n_head not divisible by the mixing group raises ValueError."""
    with pytest.raises(ValueError, match="n_head"):
        make_mixer(kind, n_head, 4, group)
