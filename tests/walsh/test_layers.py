"""Structured linear layers: TernaryLinear, CayleyDicksonLinear and WalshLinear
(MODEL_SPEC sections 1-4)."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_err

from walsh.algebra import cd_multiply, hadamard_matrix, layer_sign_matrix
from walsh.layers import CayleyDicksonLinear, TernaryLinear, WalshLinear
from walsh.quant import act_quant_ste

# (kind, A, impl, n_in, n_out): odd per-block sizes wherever the layer allows them.
LAYER_CASES = [
    ("dense", 1, None, 7, 5),
    ("cd", 2, None, 3, 5),
    ("cd", 4, None, 5, 7),
    ("cd", 8, None, 7, 3),
    ("cd", 16, None, 3, 5),
    ("walsh", 2, "blocks", 5, 3),
    ("walsh", 2, "dense", 5, 3),
    ("walsh", 8, "blocks", 3, 7),
    ("walsh", 8, "dense", 3, 7),
    ("walsh", 32, "blocks", 5, 3),
    ("walsh", 32, "dense", 5, 3),
]


def case_id(case) -> str:
    kind, a, impl, n_in, n_out = case
    return f"{kind}{a}" + (f"-{impl}" if impl else "") + f"-{n_in}x{n_out}"






def make_layer(kind, a, impl, in_f, out_f, **kw):
    if kind == "dense":
        return TernaryLinear(in_f, out_f, **kw)
    if kind == "cd":
        return CayleyDicksonLinear(in_f, out_f, algebra_dim=a, **kw)
    return WalshLinear(in_f, out_f, blocks=a, impl=impl, **kw)


def build(case, gen, ternary, bias=False, **kw):
    """Layer of ``case`` with random bias / alpha / beta (uniform 0.5..1.5) so all are exercised."""
    kind, a, impl, n_in, n_out = case
    layer = make_layer(kind, a, impl, a * n_in, a * n_out, ternary=ternary, bias=bias, **kw)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
        if isinstance(layer, WalshLinear):
            layer.alpha.copy_(0.5 + torch.rand(layer.alpha.shape, generator=gen))
            layer.beta.copy_(0.5 + torch.rand(layer.beta.shape, generator=gen))
    return layer


def dense_ref(layer, x):
    y = x @ layer.dense_weight().T
    return y + layer.bias if layer.bias is not None else y


# -- forward and backward against the dense effective matrix -------------------------------------


@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_forward_equals_dense_weight(case, ternary, bias, gen):
    """layer(x) == x @ dense_weight().T (+ bias), leading dims [2, 3] preserved (rel < 1e-5)."""
    layer = build(case, gen, ternary, bias)
    x = torch.randn(2, 3, layer.in_features, generator=gen)
    y = layer(x)
    assert y.shape == (2, 3, layer.out_features)
    assert layer.dense_weight().shape == (layer.out_features, layer.in_features)
    assert rel_err(y, dense_ref(layer, x)) < 1e-5


@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_gradients_equal_dense_weight_path(case, ternary, bias, gen):
    """Grads w.r.t. the input and every parameter match those of x @ dense_weight().T (+ bias)."""
    layer = build(case, gen, ternary, bias)
    names, params = zip(*layer.named_parameters())
    expected = {"weight"} | ({"bias"} if bias else set())
    if case[0] == "walsh":
        expected |= {"alpha", "beta"}
    assert set(names) == expected
    x = torch.randn(2, 3, layer.in_features, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, layer.out_features, generator=gen)
    got = torch.autograd.grad(layer(x), (x, *params), g)
    ref = torch.autograd.grad(dense_ref(layer, x), (x, *params), g)
    for name, a, b in zip(("input",) + names, got, ref):
        assert b.norm() > 0, name
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("case", [c for c in LAYER_CASES if c[0] != "dense"], ids=case_id)
def test_act_bits_8_quantizes_the_input(case, gen):
    """With act_bits=8 the layer equals act_quant_ste(x) @ dense_weight().T."""
    layer = build(case, gen, ternary=True, act_bits=8)
    x = torch.randn(2, 3, layer.in_features, generator=gen)
    assert rel_err(layer(x), dense_ref(layer, act_quant_ste(x))) < 1e-5


def test_dense_ternary_off_is_nn_linear(gen):
    """TernaryLinear(ternary=False) is a plain linear layer over its latent weight."""
    layer = build(LAYER_CASES[0], gen, ternary=False, bias=True)
    x = torch.randn(4, layer.in_features, generator=gen)
    assert torch.equal(layer.dense_weight(), layer.weight[0])
    ref = torch.nn.functional.linear(x, layer.weight[0], layer.bias)
    assert rel_err(layer(x), ref) < 1e-6


# -- Cayley-Dickson structure -------------------------------------------------------------------


@pytest.mark.parametrize("a,n_in,n_out", [(2, 3, 5), (4, 5, 3), (8, 3, 7), (16, 5, 3)])
def test_cd_dense_weight_blocks(a, n_in, n_out, gen):
    """Block (i, j) of the dense matrix is exactly S[i, j] * W_{i^j} (non-ternary)."""
    layer = CayleyDicksonLinear(a * n_in, a * n_out, algebra_dim=a, ternary=False)
    dw = layer.dense_weight()
    w = layer.effective_weight()
    assert torch.equal(w, layer.weight)
    s = layer_sign_matrix(a)
    for i in range(a):
        for j in range(a):
            block = dw[i * n_out : (i + 1) * n_out, j * n_in : (j + 1) * n_in]
            assert torch.equal(block, s[i, j] * w[i ^ j]), (i, j)


@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("a", (2, 4, 8, 16))
def test_cd_layer_is_algebra_product(a, ternary, gen):
    """With n_in = n_out = 1 the layer computes y = x * w (input on the left) in the algebra."""
    layer = CayleyDicksonLinear(a, a, algebra_dim=a, ternary=ternary)
    w = layer.effective_weight().detach()[:, 0, 0]  # the component vector
    x = torch.randn(2, 5, a, generator=gen)
    ref = cd_multiply(x, w.expand_as(x))
    assert rel_err(layer(x), ref) < 1e-6
    if a >= 4:  # non-commutative: w * x is a different map
        assert rel_err(layer(x), cd_multiply(w.expand_as(x), x)) > 1e-2


# -- Walsh structure -------------------------------------------------------------------------


def walsh_recipe(layer: WalshLinear, x: torch.Tensor) -> torch.Tensor:
    """The 4-step recipe of MODEL_SPEC section 3 with a dense Hadamard matrix (naive reference)."""
    a, n_in = layer.blocks, layer.n_in
    h = hadamard_matrix(a)
    xb = x.reshape(-1, a, n_in)  # X[n, g, c]
    u = torch.einsum("gk,nkc->ngc", h, layer.alpha * xb)  # 1. U = H (alpha * X)
    w = layer.effective_weight()
    y = torch.einsum("goc,ngc->ngo", w, u)  # 2. Y_g = W_g U_g
    z = torch.einsum("hg,ngo->nho", h, y)  # 3. Z = H Y
    out = (layer.beta * z).reshape(*x.shape[:-1], layer.out_features)  # 4. beta * Z
    return out + layer.bias if layer.bias is not None else out


def walsh_closed_form(layer: WalshLinear, x: torch.Tensor) -> torch.Tensor:
    """out_h = beta_h sum_k V_{h^k} (alpha_k x_k), V_m = (1/A) sum_g (-1)^popcount(g&m) W_g."""
    a, n_in = layer.blocks, layer.n_in
    hs = hadamard_matrix(a, normalized=False)
    w = layer.effective_weight().detach()
    v = [sum(hs[g, m] * w[g] for g in range(a)) / a for m in range(a)]
    xb = x.reshape(-1, a, n_in)
    outs = []
    for h in range(a):
        acc = sum((layer.alpha[k] * xb[:, k]) @ v[h ^ k].T for k in range(a))
        outs.append(layer.beta[h] * acc)
    out = torch.stack(outs, dim=1).reshape(*x.shape[:-1], layer.out_features)
    return out + layer.bias if layer.bias is not None else out


@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("a,n_in,n_out", [(2, 3, 5), (8, 5, 3), (32, 3, 7)])
def test_walsh_blocks_equals_spec_recipe(a, n_in, n_out, ternary, gen):
    """The blocks forward equals the explicit transform / GEMM / transform / scale recipe."""
    layer = build(("walsh", a, "blocks", n_in, n_out), gen, ternary, bias=True)
    x = torch.randn(2, 3, a * n_in, generator=gen)
    with torch.no_grad():
        assert rel_err(layer(x), walsh_recipe(layer, x)) < 1e-5


@pytest.mark.parametrize("impl", ("blocks", "dense"))
@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("a,n_in,n_out", [(2, 5, 3), (8, 3, 5), (32, 3, 3)])
def test_walsh_closed_form(a, n_in, n_out, ternary, impl, gen):
    """Both impls equal the dyadic-convolution closed form with V_m from the spec."""
    layer = build(("walsh", a, impl, n_in, n_out), gen, ternary)
    x = torch.randn(2, 3, a * n_in, generator=gen)
    with torch.no_grad():
        assert rel_err(layer(x), walsh_closed_form(layer, x)) < 1e-5


@pytest.mark.parametrize("ternary", (False, True))
def test_walsh_impls_agree(ternary, gen):
    """impl="blocks" and impl="dense" compute the same function from the same parameters."""
    blocks = build(("walsh", 8, "blocks", 5, 3), gen, ternary, bias=True)
    dense = WalshLinear(40, 24, blocks=8, impl="dense", ternary=ternary, bias=True)
    dense.load_state_dict(blocks.state_dict())
    x = torch.randn(3, 40, generator=gen)
    with torch.no_grad():
        assert rel_err(blocks(x), dense(x)) < 1e-5


def test_walsh_gains_init_to_one_and_survive_reset():
    """alpha and beta start at 1 and reset_parameters puts them back at 1."""
    layer = WalshLinear(24, 40, blocks=8)
    assert torch.equal(layer.alpha, torch.ones(8, 3))
    assert torch.equal(layer.beta, torch.ones(8, 5))
    with torch.no_grad():
        layer.alpha.mul_(3.0)
        layer.beta.mul_(0.1)
    layer.reset_parameters()
    assert torch.equal(layer.alpha, torch.ones(8, 3))
    assert torch.equal(layer.beta, torch.ones(8, 5))


# -- ternary codes -------------------------------------------------------------------------------


@pytest.mark.parametrize("per_component", (False, True))
@pytest.mark.parametrize("case", [LAYER_CASES[0], LAYER_CASES[3], LAYER_CASES[7]], ids=case_id)
def test_codes_match_formula(case, per_component, gen):
    """layer.codes() equals clip(round(W / mean|W|), -1, 1) computed here, exactly."""
    layer = build(case, gen, ternary=True, per_component_scale=per_component)
    w = layer.weight.detach()
    if per_component:
        gamma = w.abs().mean(dim=(1, 2), keepdim=True)
    else:
        gamma = w.abs().mean()
    codes, scale = layer.codes()
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert torch.equal(codes, torch.clamp(torch.round(w / gamma), -1, 1).to(torch.int8))
    assert torch.equal(scale.reshape(gamma.shape), gamma)
    # all three code values occur at init
    assert set(codes.unique().tolist()) == {-1, 0, 1}


@pytest.mark.parametrize("a", (2, 8, 16))
def test_cd_ternary_dense_weight_is_three_valued(a, gen):
    """Every entry of a ternary CD layer's dense matrix is exactly one of {-gamma, 0, +gamma}."""
    layer = CayleyDicksonLinear(256, 256, algebra_dim=a, ternary=True)
    _, gamma = layer.codes()
    values = set(layer.dense_weight().detach().unique().tolist())
    g = gamma.item()
    assert values <= {-g, 0.0, g}, f"{len(values - {-g, 0.0, g})} values off {{-g, 0, g}}"


# -- init gain -----------------------------------------------------------------------------------

GAIN_CASES = [
    ("dense", 1, None),
    ("cd", 2, None),
    ("cd", 4, None),
    ("cd", 8, None),
    ("cd", 16, None),
    ("walsh", 2, "blocks"),
    ("walsh", 8, "blocks"),
    ("walsh", 32, "blocks"),
]


@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("kind,a,impl", GAIN_CASES)
def test_init_gain(kind, a, impl, ternary, gen):
    """Output RMS / input RMS in [0.7, 1.4] at init for unit Gaussian input [4096, 512]."""
    layer = make_layer(kind, a, impl, 512, 512, ternary=ternary)
    x = torch.randn(4096, 512, generator=gen)
    with torch.no_grad():
        y = layer(x)
    ratio = (y.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()
    assert 0.7 <= ratio <= 1.4, ratio


@pytest.mark.parametrize("ternary", (False, True))
def test_init_scale_scales_gain(ternary, gen):
    """init_scale multiplies the init gain (residual output projections use 1/sqrt(2 n_layer))."""
    x = torch.randn(2048, 256, generator=gen)
    ratios = []
    for scale in (1.0, 0.25):
        layer = WalshLinear(256, 256, blocks=8, ternary=ternary, init_scale=scale)
        with torch.no_grad():
            ratios.append((layer(x).norm() / x.norm()).item())
    assert 0.2 < ratios[1] / ratios[0] < 0.3


# -- errors and accounting -------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda i, o: CayleyDicksonLinear(i, o, algebra_dim=4),
        lambda i, o: WalshLinear(i, o, blocks=4),
    ],
    ids=("cd", "walsh"),
)
def test_indivisible_sizes_raise(make):
    """in/out not divisible by the algebra dim raise ValueError naming the offending argument."""
    with pytest.raises(ValueError, match="in_features"):
        make(10, 16)
    with pytest.raises(ValueError, match="out_features"):
        make(16, 10)


@pytest.mark.parametrize("a", (0, 3, 5, 32))
def test_cd_bad_algebra_dim_raises(a):
    """CayleyDicksonLinear rejects algebra dims outside {1, 2, 4, 8, 16}."""
    with pytest.raises(ValueError):
        CayleyDicksonLinear(96, 96, algebra_dim=a)


@pytest.mark.parametrize("blocks", (0, 1, 3, 6, 12))
def test_walsh_bad_blocks_raises(blocks):
    """WalshLinear rejects block counts that are not a power of two >= 2."""
    with pytest.raises(ValueError):
        WalshLinear(96, 96, blocks=blocks)


def test_walsh_bad_impl_raises():
    """An unknown impl name raises ValueError."""
    with pytest.raises(ValueError, match="impl"):
        WalshLinear(32, 32, blocks=8, impl="foo")


def test_bad_act_bits_raises():
    """act_bits must be None or 8."""
    with pytest.raises(ValueError):
        TernaryLinear(8, 8, act_bits=4)


def test_flops_per_token_by_hand():
    """CD: 2*in*out; Walsh blocks: 2*in*out/A + (in+out)*log2(A) + (in+out); dense: 2*in*out."""
    in_f, out_f = 64, 96
    assert TernaryLinear(in_f, out_f).flops_per_token() == 12288  # 2*64*96
    assert CayleyDicksonLinear(in_f, out_f, algebra_dim=8).flops_per_token() == 12288
    # 2*64*96/8 = 1536; (64+96)*3 = 480; 64+96 = 160
    assert WalshLinear(in_f, out_f, blocks=8).flops_per_token() == 1536 + 480 + 160
    # 2*64*96/32 = 384; (64+96)*5 = 800; 160
    assert WalshLinear(in_f, out_f, blocks=32).flops_per_token() == 384 + 800 + 160
    assert WalshLinear(in_f, out_f, blocks=8, impl="dense").flops_per_token() == 12288


def test_parameter_counts():
    """Structured layers hold in*out/A weights (+ A*(n_in + n_out) gains for Walsh)."""
    cd = CayleyDicksonLinear(64, 96, algebra_dim=8)
    assert cd.weight.numel() == 64 * 96 // 8
    wl = WalshLinear(64, 96, blocks=8)
    assert sum(p.numel() for p in wl.parameters()) == 64 * 96 // 8 + 8 * (8 + 12)


# -- mixed precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("ternary", (False, True))
@pytest.mark.parametrize("a", (8, 32))
def test_walsh_blocks_autocast_bf16(a, ternary, gen):
    """Under CPU autocast bf16 the blocks forward stays close to the fp32 result (rel < 2e-2)."""
    layer = build(("walsh", a, "blocks", 8, 8), gen, ternary, bias=True)
    x = torch.randn(4, 16, a * 8, generator=gen)
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 2e-2


def test_layer_paths_name_the_compute_path():
    """``path()`` (printed by the trainer and the dry run) names what the config chose."""
    assert TernaryLinear(8, 8).path() == "TernaryLinear: one GEMM"
    assert CayleyDicksonLinear(8, 8, algebra_dim=4).path() == \
        "CayleyDicksonLinear: materialized, one GEMM"
    assert WalshLinear(8, 8, blocks=4, impl="blocks").path() == "WalshLinear: walsh_impl=blocks"
