"""Autoregressive flows (spec section 3): the ARConv masks, and the shift-only flow cell checked through its
Jacobian: autoregressive in raster order (reversed with `mirror`), unit diagonal, log-det 0, invertible.

The Jacobians come from `tf.GradientTape`, so those tests run under the TensorFlow backend only; the masks,
the cell's output and its inversion are checked under any Keras backend."""

import math

import numpy as np
import pytest
from conftest import tensorflow_backend

from nvae_tf.model.flows import FLOW_EXPANSION, ARFlowCell, autoregressive_mask, channel_mask

HEIGHT = WIDTH = 4


# ------------------------------------------------------------------------------------------------ masks
def _before_centre(a, b, m):
    """(a, b) comes strictly before the centre (m, m) in raster (row-major) order."""
    return a < m or (a == m and b < m)


def _expected_channel_visible(i, o, cin, cout, zero_diag):
    """Spec section 3: does output channel o see input channel i at the centre pixel (dense conv)?"""
    if cout >= cin:
        r = cout // cin
        block = o // r  # output block of channel o
        return i < block if zero_diag else i <= block
    r = cin // cout
    if zero_diag:
        return i < (o + 1) * r and not (o * r <= i < (o + 1) * r)
    return i < (o + 1) * r


def _expected_mask(k, cin, cout, zero_diag, mirror=False, depthwise=False):
    """An independent construction of the ARConv2d mask, one entry at a time."""
    m = (k - 1) // 2
    out = 1 if depthwise else cout
    mask = np.zeros((k, k, cin, out), dtype=np.float32)
    for a in range(k):
        for b in range(k):
            # mirror flips the spatial order only: position (a, b) plays the role of (k-1-a, k-1-b).
            sa, sb = (k - 1 - a, k - 1 - b) if mirror else (a, b)
            for i in range(cin):
                for o in range(out):
                    if _before_centre(sa, sb, m):
                        mask[a, b, i, o] = 1.0
                    elif (sa, sb) == (m, m):
                        if depthwise:
                            mask[a, b, i, o] = 0.0 if zero_diag else 1.0
                        else:
                            mask[a, b, i, o] = float(_expected_channel_visible(i, o, cin, cout, zero_diag))
    return mask


@pytest.mark.parametrize("cin,cout,zero_diag", [
    (3, 18, True), (3, 18, False), (4, 4, True), (4, 4, False), (18, 3, False), (18, 3, True), (12, 4, False)])
def test_channel_mask_follows_spec_rule(cin, cout, zero_diag):
    mask = channel_mask(cin, cout, zero_diag)
    assert mask.shape == (cin, cout)
    expected = np.array([[_expected_channel_visible(i, o, cin, cout, zero_diag) for o in range(cout)]
                         for i in range(cin)], dtype=np.float32)
    np.testing.assert_array_equal(mask, expected)


def test_channel_mask_spec_examples():
    # nz -> 6 nz with zero_diag: block 0 (outputs 0..5) sees nothing, block 1 sees input 0, block 2 inputs 0, 1.
    mask = channel_mask(3, 18, zero_diag=True)
    assert not mask[:, 0:6].any()
    np.testing.assert_array_equal(mask[:, 6:12], np.tile([[1.0], [0.0], [0.0]], (1, 6)))
    np.testing.assert_array_equal(mask[:, 12:18], np.tile([[1.0], [1.0], [0.0]], (1, 6)))
    # 6 nz -> nz without zero_diag: output i sees inputs < 6 (i + 1).
    mask = channel_mask(18, 3, zero_diag=False)
    for o in range(3):
        np.testing.assert_array_equal(mask[:, o], (np.arange(18) < 6 * (o + 1)).astype(np.float32))


@pytest.mark.parametrize("nz", [3, 4])
def test_mask_3x3_zero_diag_nz_to_6nz(nz):
    hidden = FLOW_EXPANSION * nz
    mask = autoregressive_mask(3, nz, hidden, zero_diag=True)
    assert mask.shape == (3, 3, nz, hidden)
    np.testing.assert_array_equal(mask, _expected_mask(3, nz, hidden, zero_diag=True))
    # Rows above the centre and the left centre pixel are fully visible, later pixels hidden.
    assert mask[0].all() and mask[1, 0].all()
    assert not mask[1, 2].any() and not mask[2].any()
    # The centre is strictly lower-triangular by block: no output sees its own input channel.
    for o in range(hidden):
        assert mask[1, 1, o // FLOW_EXPANSION, o] == 0.0


@pytest.mark.parametrize("zero_diag", [False, True])
def test_mask_depthwise_5x5(zero_diag):
    channels = 18
    mask = autoregressive_mask(5, channels, channels, zero_diag=zero_diag, depthwise=True)
    assert mask.shape == (5, 5, channels, 1)
    np.testing.assert_array_equal(mask, _expected_mask(5, channels, channels, zero_diag, depthwise=True))
    assert mask[2, 2].all() == (not zero_diag) and mask[2, 2].any() == (not zero_diag)
    assert mask[:2].all() and mask[2, :2].all() and not mask[2, 3:].any() and not mask[3:].any()


@pytest.mark.parametrize("zero_diag", [False, True])
def test_mask_1x1_6nz_to_nz(zero_diag):
    nz = 4
    mask = autoregressive_mask(1, FLOW_EXPANSION * nz, nz, zero_diag=zero_diag)
    assert mask.shape == (1, 1, FLOW_EXPANSION * nz, nz)
    np.testing.assert_array_equal(mask, _expected_mask(1, FLOW_EXPANSION * nz, nz, zero_diag))


@pytest.mark.parametrize("k,cin,cout,zero_diag,depthwise", [
    (3, 3, 18, True, False), (5, 18, 18, False, True), (1, 18, 3, False, False), (5, 4, 8, False, False)])
def test_mirror_flips_spatial_order_only(k, cin, cout, zero_diag, depthwise):
    plain = autoregressive_mask(k, cin, cout, zero_diag, depthwise=depthwise)
    mirrored = autoregressive_mask(k, cin, cout, zero_diag, mirror=True, depthwise=depthwise)
    np.testing.assert_array_equal(mirrored, _expected_mask(k, cin, cout, zero_diag, mirror=True,
                                                           depthwise=depthwise))
    # Spatial flip of both axes; the channel mask at the centre is unchanged.
    for a in range(k):
        for b in range(k):
            np.testing.assert_array_equal(mirrored[a, b], plain[k - 1 - a, k - 1 - b])
    m = (k - 1) // 2
    np.testing.assert_array_equal(mirrored[m, m], plain[m, m])
    if k > 1:
        # Mirrored: positions after the centre are visible, positions before it hidden.
        assert mirrored[m + 1:].all() and mirrored[m, m + 1:].all()
        assert not mirrored[:m].any() and not mirrored[m, :m].any()


# ------------------------------------------------------------------------------------------ flow cell
def _randomised_cell(nz, mirror, seed=0):
    """A built flow cell with random raw kernels, weight norms and bias, so that no dependence vanishes."""
    cell = ARFlowCell(nz, mirror=mirror)
    cell.build()
    rng = np.random.default_rng(seed)
    for conv in (cell.conv_in, cell.conv_depthwise, cell.conv_out):
        conv.kernel.assign(rng.normal(size=conv.kernel.shape).astype("float32"))
        conv.log_weight_norm.assign(rng.uniform(-0.5, 0.5, size=conv.log_weight_norm.shape).astype("float32"))
    cell.conv_out.bias.assign(rng.normal(size=cell.conv_out.bias.shape).astype("float32"))
    return cell


def _jacobian(fn, z):
    tf = tensorflow_backend()  # tf.GradientTape().jacobian
    z = tf.convert_to_tensor(z)
    with tf.GradientTape() as tape:
        tape.watch(z)
        out = fn(z)
    jac = tape.jacobian(out, z).numpy()
    n = int(np.prod(z.shape))
    return jac.reshape(n, n)  # row: output (y, x, c) flattened row-major, column: input likewise


def _allowed(nz, mirror):
    """allowed[a, b]: output a = (p, i) may depend on input b = (q, j) (flattened [h, w, nz] indices)."""
    idx = np.arange(HEIGHT * WIDTH * nz)
    pos, ch = idx // nz, idx % nz  # raster position and channel
    p, i = pos[:, None], ch[:, None]
    q, j = pos[None, :], ch[None, :]
    earlier = q > p if mirror else q < p
    return earlier | ((q == p) & (j < i))


def _index(y, x, c, nz):
    return (y * WIDTH + x) * nz + c


@pytest.mark.parametrize("nz", [3, 4])
@pytest.mark.parametrize("mirror", [False, True])
def test_flow_shift_is_autoregressive(nz, mirror):
    tensorflow_backend()
    cell = _randomised_cell(nz, mirror, seed=nz + 10 * mirror)
    z = np.random.normal(size=(1, HEIGHT, WIDTH, nz)).astype("float32")
    jac = _jacobian(cell.shift, z)
    allowed = _allowed(nz, mirror)
    # Exactly zero outside the autoregressive pattern (masked weights are exact zeros).
    forbidden = jac[~allowed]
    assert np.count_nonzero(forbidden) == 0, f"max forbidden |d shift/dz| = {np.abs(forbidden).max()}"
    # ...and not trivially zero inside it: the previous pixel (all channel pairs) and the lower channels at
    # the same pixel matter, as does a pixel 3 rows away (reached through the 3x3 and the 5x5 convs).
    step = 1 if mirror else -1
    y, x = (0, 1) if mirror else (HEIGHT - 1, WIDTH - 2)
    for i in range(nz):
        for j in range(nz):
            assert jac[_index(y, x, i, nz), _index(y, x + step, j, nz)] != 0.0
            if j < i:
                assert jac[_index(y, x, i, nz), _index(y, x, j, nz)] != 0.0
    far = (HEIGHT - 1, x) if mirror else (0, x)
    assert np.abs(jac[_index(y, x, 0, nz), [_index(*far, j, nz) for j in range(nz)]]).max() > 0.0
    assert np.count_nonzero(jac[allowed]) > 0.5 * allowed.sum()


@pytest.mark.parametrize("mirror", [False, True])
def test_flow_shift_autoregressive_with_initial_weights(mirror):
    tensorflow_backend()
    nz = 3
    cell = ARFlowCell(nz, mirror=mirror)
    cell.build()
    jac = _jacobian(cell.shift, np.random.normal(size=(1, HEIGHT, WIDTH, nz)).astype("float32"))
    allowed = _allowed(nz, mirror)
    assert np.count_nonzero(jac[~allowed]) == 0
    assert np.count_nonzero(jac[allowed]) > 0


@pytest.mark.parametrize("mirror", [False, True])
def test_flow_jacobian_unit_diagonal_and_unit_determinant(mirror):
    tensorflow_backend()
    nz = 3
    cell = _randomised_cell(nz, mirror, seed=3)
    z = np.random.normal(size=(1, HEIGHT, WIDTH, nz)).astype("float32")
    jac = _jacobian(cell, z).astype(np.float64)  # of z -> z - shift(z)
    np.testing.assert_array_equal(np.diag(jac), np.ones(jac.shape[0]))
    # Triangular after ordering the positions in the cell's raster order (reversed when mirrored).
    n = jac.shape[0]
    order = np.arange(n)
    if mirror:
        pos, ch = order // nz, order % nz
        order = np.lexsort((ch, -pos))  # positions last-to-first, channels ascending within a position
    permuted = jac[np.ix_(order, order)]
    assert np.count_nonzero(np.triu(permuted, k=1)) == 0
    assert np.count_nonzero(np.tril(permuted, k=-1)) > 0
    sign, logdet = np.linalg.slogdet(jac)
    assert sign == 1.0
    assert abs(logdet) < 1e-6
    assert np.linalg.det(jac) == pytest.approx(1.0, abs=1e-6)


def test_flow_cell_output_is_z_minus_shift():
    cell = _randomised_cell(4, mirror=False, seed=5)
    z = np.random.normal(size=(2, HEIGHT, WIDTH, 4)).astype("float32")
    out = np.asarray(cell(z))
    shift = np.asarray(cell.shift(z))
    assert np.abs(shift).max() > 1e-3
    np.testing.assert_allclose(out, z - shift, rtol=1e-6, atol=1e-6)


def test_flow_convs_apply_their_masks():
    nz = 3
    for mirror in (False, True):
        cell = _randomised_cell(nz, mirror, seed=7)
        expected = {
            "conv_in": _expected_mask(3, nz, 6 * nz, zero_diag=True, mirror=mirror),
            "conv_depthwise": _expected_mask(5, 6 * nz, 6 * nz, zero_diag=False, mirror=mirror, depthwise=True),
            "conv_out": _expected_mask(1, 6 * nz, nz, zero_diag=False, mirror=mirror),
        }
        for name, mask in expected.items():
            kernel = np.asarray(getattr(cell, name).effective_kernel())
            assert kernel.shape == mask.shape
            assert np.count_nonzero(kernel[mask == 0]) == 0, name
            assert np.count_nonzero(kernel[mask == 1]) == int(mask.sum()), name


def test_flow_weight_norm_init_uses_masked_kernel_and_output_offset():
    """Spec section 3: g = log(||v * mask|| + 0.01), and the output conv's g-init is lowered by log 10."""
    nz = 3
    cell = ARFlowCell(nz)
    cell.build()
    for conv, offset, axes in ((cell.conv_in, 0.0, (0, 1, 2)), (cell.conv_depthwise, 0.0, (0, 1, 3)),
                               (cell.conv_out, math.log(0.1), (0, 1, 2))):
        masked = np.asarray(conv.kernel, dtype=np.float64) * conv.mask
        norm = np.sqrt((masked ** 2).sum(axis=axes)).reshape(-1)
        np.testing.assert_allclose(np.asarray(conv.log_weight_norm).reshape(-1), np.log(norm + 0.01) + offset,
                                   rtol=1e-5, atol=1e-5)


def _invert(cell, y, iterations):
    """Solve y = z - shift(z) by fixed-point iteration z <- y + shift(z) (exact after the chain length)."""
    z = y
    for _ in range(iterations):
        z = y + cell.shift(z)
    return z


def _paired_cells(nz):
    return _randomised_cell(nz, mirror=False, seed=11), _randomised_cell(nz, mirror=True, seed=12)


def test_paired_cells_are_invertible():
    nz = 3
    first, second = _paired_cells(nz)
    z = np.random.normal(size=(2, HEIGHT, WIDTH, nz)).astype("float32")
    y = second(first(z))
    assert np.abs(np.asarray(y) - z).max() > 1e-2
    # A triangular map is inverted by fixed-point iteration in at most (number of dimensions) steps.
    steps = HEIGHT * WIDTH * nz + 1
    recovered = _invert(first, _invert(second, y, steps), steps)
    np.testing.assert_allclose(np.asarray(recovered), z, rtol=1e-4, atol=1e-4)


def test_paired_cells_have_unit_determinant():
    tensorflow_backend()
    nz = 3
    first, second = _paired_cells(nz)
    z = np.random.normal(size=(1, HEIGHT, WIDTH, nz)).astype("float32")
    jac = _jacobian(lambda t: second(first(t)), z).astype(np.float64)
    sign, logdet = np.linalg.slogdet(jac)
    assert sign == 1.0 and abs(logdet) < 1e-5
