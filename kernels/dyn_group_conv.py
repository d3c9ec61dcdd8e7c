"""Dynamic group convolution (CondFace, thesis ch. 5): per-sample mixtures of expert kernels.

Maths, for x [B, Cin, H, W], experts [m, n, Co, Ci, k, k] (Co = Cout/m, Ci = Cin/m) and routing
[B, m, n] (one routing vector over the n experts of each of the m channel groups):

    W_bg        = Σ_e routing[b, g, e] · experts[g, e]                      [Co, Ci, k, k]
    out[b, g·Co : (g+1)·Co] = conv2d(x[b, g·Ci : (g+1)·Ci], W_bg, stride, padding)

m = 1 is dynamic convolution (CondConv / DyConv). The reference below is the usual
aggregate-then-grouped-conv: it builds the B·m mixed kernels and runs one F.conv2d with the batch
folded into the groups (groups = B·m), differentiated by torch autograd.

Gradients, with G_bg = ∂L/∂W_bg = Σ_pixels grad_out[b, g] ⊗ im2col(x[b, g]) (the per-sample weight
gradient):

    ∂L/∂x[b, g]                = conv_transpose2d(grad_out[b, g], W_bg, stride, padding)
    ∂L/∂experts[g, e]          = Σ_b routing[b, g, e] · G_bg
    ∂L/∂routing[b, g, e]       = ⟨G_bg, experts[g, e]⟩

The Triton path never writes a mixed kernel W_bg or a G_bg to HBM (the reference holds B·m of
each: B·Cout·Ci·k² elements, as large as the expert bank times B/n):

* forward: an implicit-GEMM direct convolution. One program computes a [BLOCK_CO, BLOCK_P] tile of
  out[b, g] (output channels × output pixels). Per step of the reduction over (ci, kh, kw) it reads
  the n experts' [BLOCK_CO, BLOCK_R] slices, mixes them in registers with the sample's routing
  weights, gathers the [BLOCK_R, BLOCK_P] im2col tile of x straight from x (padding by masks) and
  multiplies on tensor cores. Reads n·Co·R expert elements per pixel tile (R = Ci·k², mostly L2
  hits: every program of a group reads the same bank) and R·BLOCK_P input elements per
  channel tile; writes the output once. The mixing costs n/BLOCK_P of the GEMM's FLOPs.
* ∂x: the transposed convolution as an implicit GEMM over (co, kh, kw), with the mixed kernel
  recomputed the same way (transposed) and grad_out gathered where stride divides the offset.
* ∂experts and ∂routing: one program owns a [BLOCK_CO, BLOCK_R] tile of one group's weights and a
  slice of the batch. For each sample it computes the G_bg tile on chip (a GEMM over that sample's
  pixels: grad_out and im2col(x) tiles, the im2col recomputed), then adds routing[b, g, :]·G into
  an [n, BLOCK_CO, BLOCK_R] fp32 accumulator and reduces ⟨G, experts[g, :]⟩ over the tile (the
  experts' tile is read once per program and stays in registers). The accumulator reaches HBM once
  per batch slice: an fp32 [slices, m, n, Co, R] buffer summed by the launcher (slices only as
  many as fill the device, ≤ B), and the ∂routing shares go to an fp32 [tiles, B, m, n] buffer
  summed likewise; no atomics, so every gradient is bitwise reproducible. grad_out is read
  R/BLOCK_R times and x (through im2col, each element up to k² times) Co/BLOCK_CO times.

Numerics: accumulation is fp32; mixed kernels are rounded to the input dtype before each dot (as a
conv with a materialised 16-bit kernel would be); outputs and gradients are returned in the input
dtype. Against float64 (tests/kernels/test_dyn_group_conv.py) output and gradients agree within
:data:`TOLERANCES` (each relative to its entry plus a fraction of its largest entry).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from facekd.kernels.backend import ENV_VAR, check_nonempty, full_precision, reference_dtype, use_triton
from facekd.kernels.common import dot, dot_precision

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mixed_weight_tile(
    experts_ptr,  # [m, n, Co, Ci, k, k] expert kernels
    group_offset,  # int64, g·n·Co·R: the first element of group g's bank
    expert_size,  # Co·R, the distance between two experts of a group
    routing,  # [N_PAD] fp32, routing[b, g, :] (0 past n)
    offs_e,  # [N_PAD] expert index
    mask_e,  # [N_PAD]
    row_offsets,  # [BLOCK_A] offset of each tile row inside one expert
    mask_rows,  # [BLOCK_A]
    col_offsets,  # [BLOCK_B] offset of each tile column inside one expert
    mask_cols,  # [BLOCK_B]
):
    """Σ_e routing[e]·experts[g, e] on one [BLOCK_A, BLOCK_B] tile, fp32, in registers.

    Rows and columns are any two index sets of the expert (a forward tile: output channel × (ci, kh,
    kw); a ∂x tile: input channel × (co, kh, kw)). Reads n·BLOCK_A·BLOCK_B elements.
    """
    pointers = (experts_ptr + group_offset + offs_e[:, None, None].to(tl.int64) * expert_size
                + row_offsets[None, :, None] + col_offsets[None, None, :])
    mask = mask_e[:, None, None] & mask_rows[None, :, None] & mask_cols[None, None, :]
    bank = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(bank * routing[:, None, None], axis=0)


@triton.jit
def _im2col_tile(
    x_ptr,  # [B, Cin, H, W] input
    sample_offset,  # int64, (b·Cin + g·Ci)·H·W: channel 0 of group g of sample b
    offs_r,  # [BLOCK_R] reduction index r = (ci·k + kh)·k + kw
    mask_r,  # [BLOCK_R]
    offs_p,  # [BLOCK_P] output pixel oh·Wo + ow
    mask_p,  # [BLOCK_P]
    height,
    width,
    out_width,
    stride,
    padding,
    KSIZE: tl.constexpr,
):
    """im2col(x[b, g])[r, p] of one [BLOCK_R, BLOCK_P] tile, gathered from x; 0 in the padding."""
    ci = offs_r // (KSIZE * KSIZE)
    kh = (offs_r // KSIZE) % KSIZE
    kw = offs_r % KSIZE
    oh = offs_p // out_width
    ow = offs_p % out_width
    ih = oh[None, :] * stride - padding + kh[:, None]
    iw = ow[None, :] * stride - padding + kw[:, None]
    inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    mask = mask_r[:, None] & mask_p[None, :] & inside
    offsets = ci[:, None] * (height * width) + tl.where(inside, ih * width + iw, 0)
    return tl.load(x_ptr + sample_offset + offsets, mask=mask, other=0.0)


@triton.jit
def _forward_kernel(
    x_ptr,  # [B, Cin, H, W] input
    experts_ptr,  # [m, n, Co, Ci, k, k]
    routing_ptr,  # [B, m, n]
    out_ptr,  # [B, m·Co, Ho, Wo] out, the input's dtype
    groups,  # m
    n_experts,  # n
    in_channels,  # Cin
    out_group_channels,  # Co
    height,
    width,
    out_height,
    out_width,
    stride,
    padding,
    KSIZE: tl.constexpr,  # k
    N_PAD: tl.constexpr,  # next power of two ≥ n
    DOT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[b, g] on one [BLOCK_CO, BLOCK_P] tile, program (pixel tile, channel tile, b·m + g).

    acc += mix(experts)[co, r] @ im2col(x)[r, p] over BLOCK_R steps of R = Ci·k²; the mixed tile
    and the accumulator stay on chip. Reads n·BLOCK_CO·R + R·BLOCK_P elements; writes
    BLOCK_CO·BLOCK_P.
    """
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // groups
    g = pid_bg % groups
    in_group_channels = in_channels // groups
    reduction = in_group_channels * KSIZE * KSIZE
    out_pixels = out_height * out_width
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < out_group_channels
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < out_pixels
    offs_e = tl.arange(0, N_PAD)
    mask_e = offs_e < n_experts
    routing = tl.load(routing_ptr + pid_bg * n_experts + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    group_offset = g.to(tl.int64) * n_experts * out_group_channels * reduction
    sample_offset = (b.to(tl.int64) * in_channels + g * in_group_channels) * height * width
    acc = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)
    for r0 in range(0, reduction, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < reduction
        weight = _mixed_weight_tile(experts_ptr, group_offset, out_group_channels * reduction, routing, offs_e,
                                    mask_e, offs_co * reduction, mask_co, offs_r, mask_r)
        patches = _im2col_tile(x_ptr, sample_offset, offs_r, mask_r, offs_p, mask_p, height, width, out_width,
                               stride, padding, KSIZE)
        acc = dot(weight.to(patches.dtype), patches, acc, DOT_PRECISION)
    out_channel = b.to(tl.int64) * groups * out_group_channels + g * out_group_channels + offs_co
    tl.store(out_ptr + out_channel[:, None] * out_pixels + offs_p[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_co[:, None] & mask_p[None, :])


@triton.jit
def _grad_input_kernel(
    grad_out_ptr,  # [B, m·Co, Ho, Wo] incoming gradient
    experts_ptr,  # [m, n, Co, Ci, k, k]
    routing_ptr,  # [B, m, n]
    grad_x_ptr,  # [B, Cin, H, W] out, the input's dtype
    groups,
    n_experts,
    in_channels,
    out_group_channels,
    height,
    width,
    out_height,
    out_width,
    stride,
    padding,
    KSIZE: tl.constexpr,
    N_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """∂x[b, g] on one [BLOCK_CI, BLOCK_P] tile (input channels × input pixels): the transposed conv.

    ∂x[ci, ih, iw] = Σ_{co, kh, kw} W_bg[co, ci, kh, kw]·grad_out[co, (ih + pad − kh)/s, (iw + pad − kw)/s]
    over the offsets stride divides, as a GEMM over r = (co·k + kh)·k + kw with the mixed kernel
    recomputed on chip. Reads n·BLOCK_CI·Co·k² + Co·k²·BLOCK_P elements; writes BLOCK_CI·BLOCK_P.
    """
    pid_p = tl.program_id(0)
    pid_ci = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // groups
    g = pid_bg % groups
    in_group_channels = in_channels // groups
    kernel_area = KSIZE * KSIZE
    weight_reduction = in_group_channels * kernel_area  # R of the forward: one output channel's weights
    reduction = out_group_channels * kernel_area
    out_pixels = out_height * out_width
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_ci = offs_ci < in_group_channels
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < height * width
    ih = offs_p // width
    iw = offs_p % width
    offs_e = tl.arange(0, N_PAD)
    mask_e = offs_e < n_experts
    routing = tl.load(routing_ptr + pid_bg * n_experts + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    group_offset = g.to(tl.int64) * n_experts * out_group_channels * weight_reduction
    grad_out_offset = (b.to(tl.int64) * groups + g) * out_group_channels * out_pixels
    acc = tl.zeros([BLOCK_CI, BLOCK_P], dtype=tl.float32)
    for r0 in range(0, reduction, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < reduction
        co = offs_r // kernel_area
        kh = (offs_r // KSIZE) % KSIZE
        kw = offs_r % KSIZE
        weight = _mixed_weight_tile(experts_ptr, group_offset, out_group_channels * weight_reduction, routing,
                                    offs_e, mask_e, offs_ci * kernel_area, mask_ci,
                                    co * weight_reduction + kh * KSIZE + kw, mask_r)
        oh_stride = ih[None, :] + padding - kh[:, None]  # oh·stride, when stride divides it
        ow_stride = iw[None, :] + padding - kw[:, None]
        oh = oh_stride // stride
        ow = ow_stride // stride
        hit = ((oh_stride >= 0) & (ow_stride >= 0) & (oh_stride % stride == 0) & (ow_stride % stride == 0)
               & (oh < out_height) & (ow < out_width))
        mask = mask_r[:, None] & mask_p[None, :] & hit
        offsets = co[:, None] * out_pixels + tl.where(hit, oh * out_width + ow, 0)
        grads = tl.load(grad_out_ptr + grad_out_offset + offsets, mask=mask, other=0.0)
        acc = dot(weight.to(grads.dtype), grads, acc, DOT_PRECISION)
    channel = b.to(tl.int64) * in_channels + g * in_group_channels + offs_ci
    tl.store(grad_x_ptr + channel[:, None] * (height * width) + offs_p[None, :],
             acc.to(grad_x_ptr.dtype.element_ty), mask=mask_ci[:, None] & mask_p[None, :])


@triton.jit
def _grad_weight_kernel(
    x_ptr,  # [B, Cin, H, W] input
    grad_out_ptr,  # [B, m·Co, Ho, Wo] incoming gradient
    experts_ptr,  # [m, n, Co, Ci, k, k]
    routing_ptr,  # [B, m, n]
    grad_experts_ptr,  # [S, m, n, Co, R] fp32 out: each batch slice's Σ_b routing[b, g, e]·G_bg
    grad_routing_ptr,  # [T, B, m, n] fp32 out: each weight tile's share of ⟨G_bg, experts[g, e]⟩
    batch,
    groups,
    n_experts,
    in_channels,
    out_group_channels,
    height,
    width,
    out_height,
    out_width,
    stride,
    padding,
    samples_per_slice,
    KSIZE: tl.constexpr,
    N_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """∂experts and ∂routing of one [BLOCK_CO, BLOCK_R] weight tile of group g over a batch slice.

    Program (weight-column tile, channel tile, g·S + slice). Per sample b: G = grad_out[b, g] @
    im2col(x[b, g])ᵀ on chip (reads (BLOCK_CO + BLOCK_R)·Ho·Wo elements), then the [N_PAD,
    BLOCK_CO, BLOCK_R] accumulator += routing[b, g, :]·G and the tile's ⟨G, experts[g, e]⟩ for every
    e is written (N_PAD floats). The experts' tile is read once; the accumulator is written once.
    """
    pid_r = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_gs = tl.program_id(2)
    slices = tl.num_programs(2) // groups
    g = pid_gs // slices
    slice_index = pid_gs % slices
    tile = pid_co * tl.num_programs(0) + pid_r
    in_group_channels = in_channels // groups
    reduction = in_group_channels * KSIZE * KSIZE
    out_pixels = out_height * out_width
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < out_group_channels
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < reduction
    offs_e = tl.arange(0, N_PAD)
    mask_e = offs_e < n_experts
    expert_size = out_group_channels * reduction
    bank_offsets = (g.to(tl.int64) * n_experts * expert_size + offs_e[:, None, None].to(tl.int64) * expert_size
                    + offs_co[None, :, None] * reduction + offs_r[None, None, :])
    bank_mask = mask_e[:, None, None] & mask_co[None, :, None] & mask_r[None, None, :]
    bank = tl.load(experts_ptr + bank_offsets, mask=bank_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([N_PAD, BLOCK_CO, BLOCK_R], dtype=tl.float32)
    b_start = slice_index.to(tl.int64) * samples_per_slice  # int64 bounds: int64 offsets below
    b_end = tl.minimum(b_start + samples_per_slice, batch)
    for b in range(b_start, b_end):
        sample_offset = (b * in_channels + g * in_group_channels) * height * width
        grad_out_offset = ((b * groups + g) * out_group_channels + offs_co) * out_pixels
        sample_grad = tl.zeros([BLOCK_CO, BLOCK_R], dtype=tl.float32)
        for p0 in range(0, out_pixels, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < out_pixels
            grads = tl.load(grad_out_ptr + grad_out_offset[:, None] + offs_p[None, :],
                            mask=mask_co[:, None] & mask_p[None, :], other=0.0)
            patches = _im2col_tile(x_ptr, sample_offset, offs_r, mask_r, offs_p, mask_p, height, width,
                                   out_width, stride, padding, KSIZE)
            sample_grad = dot(grads, tl.trans(patches.to(grads.dtype)), sample_grad, DOT_PRECISION)
        routing_offset = (b * groups + g) * n_experts + offs_e
        routing = tl.load(routing_ptr + routing_offset, mask=mask_e, other=0.0).to(tl.float32)
        acc += routing[:, None, None] * sample_grad[None, :, :]
        share = tl.sum(tl.sum(bank * sample_grad[None, :, :], axis=2), axis=1)
        tl.store(grad_routing_ptr + tile.to(tl.int64) * batch * groups * n_experts + routing_offset, share,
                 mask=mask_e)
    out_offsets = (slice_index.to(tl.int64) * groups * n_experts * expert_size + bank_offsets)
    tl.store(grad_experts_ptr + out_offsets, acc, mask=bank_mask)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Sizes of one call, read from validated inputs."""

    batch: int
    in_channels: int  # Cin
    height: int
    width: int
    groups: int  # m
    n_experts: int  # n
    out_group_channels: int  # Co = Cout/m
    in_group_channels: int  # Ci = Cin/m
    ksize: int
    stride: int
    padding: int

    @classmethod
    def of(cls, x: torch.Tensor, experts: torch.Tensor, stride: int, padding: int) -> "_Geometry":
        batch, in_channels, height, width = x.shape
        groups, n_experts, out_group_channels, in_group_channels, ksize, _ = experts.shape
        return cls(batch, in_channels, height, width, groups, n_experts, out_group_channels, in_group_channels,
                   ksize, stride, padding)

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.ksize) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.ksize) // self.stride + 1

    @property
    def reduction(self) -> int:
        """R = Ci·k²: the length of one output channel's kernel."""
        return self.in_group_channels * self.ksize * self.ksize

    def runtime_args(self) -> tuple:
        """The size arguments every kernel takes after its pointers, in order."""
        return (self.groups, self.n_experts, self.in_channels, self.out_group_channels, self.height, self.width,
                self.out_height, self.out_width, self.stride, self.padding)


@dataclass(frozen=True)
class _Launch:
    """Block sizes (untuned guesses for Hopper; tl.dot needs every tile side ≥ 16)."""

    block_co: int  # output channels per forward / ∂weight tile
    block_p: int  # pixels per tile
    block_r: int  # reduction step (forward, ∂x) and weight columns per ∂weight program
    block_ci: int  # input channels per ∂x tile
    programs: int  # aim the ∂weight grid at this many programs (by slicing the batch)
    num_warps: int
    dot_precision: str

    @classmethod
    def build(cls, x: torch.Tensor, geometry: _Geometry) -> "_Launch":
        if not x.is_cuda:  # the interpreter: few, large programs
            pixels = max(geometry.out_height * geometry.out_width, geometry.height * geometry.width)
            return cls(16, max(16, min(64, triton.next_power_of_2(pixels))), 32, 16, programs=1, num_warps=4,
                       dot_precision=dot_precision(x.dtype))
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return cls.for_cuda(geometry, x.dtype, sms)

    @classmethod
    def for_cuda(cls, geometry: _Geometry, dtype: torch.dtype, sms: int) -> "_Launch":
        """Sizes for a CUDA device with ``sms`` multiprocessors; compiled for sm_90 by the tests, not yet
        timed on a GPU. The ∂weight program holds two [n, BLOCK_CO, BLOCK_R] fp32 tiles (accumulator and
        bank) in registers, so BLOCK_R shrinks as n grows."""
        block_co = max(16, min(64, triton.next_power_of_2(geometry.out_group_channels)))
        block_ci = max(16, min(64, triton.next_power_of_2(geometry.in_group_channels)))
        block_r = 32 if geometry.n_experts <= 4 else 16
        return cls(block_co, 64, block_r, block_ci, programs=4 * sms, num_warps=4,
                   dot_precision=dot_precision(dtype))


def _triton_forward(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor, geometry: _Geometry,
                    launch: _Launch) -> torch.Tensor:
    out = torch.empty(geometry.batch, geometry.groups * geometry.out_group_channels, geometry.out_height,
                      geometry.out_width, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(geometry.out_height * geometry.out_width, launch.block_p),
            triton.cdiv(geometry.out_group_channels, launch.block_co), geometry.batch * geometry.groups)
    _forward_kernel[grid](
        x, experts, routing, out, *geometry.runtime_args(),
        KSIZE=geometry.ksize, N_PAD=triton.next_power_of_2(geometry.n_experts), DOT_PRECISION=launch.dot_precision,
        BLOCK_CO=launch.block_co, BLOCK_P=launch.block_p, BLOCK_R=launch.block_r, num_warps=launch.num_warps)
    return out


def _triton_grad_input(grad_out: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor, geometry: _Geometry,
                       launch: _Launch) -> torch.Tensor:
    grad_x = torch.empty(geometry.batch, geometry.in_channels, geometry.height, geometry.width,
                         dtype=grad_out.dtype, device=grad_out.device)
    grid = (triton.cdiv(geometry.height * geometry.width, launch.block_p),
            triton.cdiv(geometry.in_group_channels, launch.block_ci), geometry.batch * geometry.groups)
    _grad_input_kernel[grid](
        grad_out, experts, routing, grad_x, *geometry.runtime_args(),
        KSIZE=geometry.ksize, N_PAD=triton.next_power_of_2(geometry.n_experts), DOT_PRECISION=launch.dot_precision,
        BLOCK_CI=launch.block_ci, BLOCK_P=launch.block_p, BLOCK_R=launch.block_r, num_warps=launch.num_warps)
    return grad_x


def _triton_grad_weight(x: torch.Tensor, grad_out: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor,
                        geometry: _Geometry, launch: _Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂experts, ∂routing) in the inputs' dtype, from fp32 per-slice and per-tile partial sums."""
    r_tiles = triton.cdiv(geometry.reduction, launch.block_r)
    co_tiles = triton.cdiv(geometry.out_group_channels, launch.block_co)
    weight_programs = r_tiles * co_tiles * geometry.groups
    slices = max(1, min(geometry.batch, triton.cdiv(launch.programs, weight_programs)))
    samples_per_slice = triton.cdiv(geometry.batch, slices)
    slices = triton.cdiv(geometry.batch, samples_per_slice)
    f32 = dict(dtype=torch.float32, device=x.device)
    grad_experts = torch.empty(slices, *experts.shape, **f32)
    grad_routing = torch.empty(r_tiles * co_tiles, *routing.shape, **f32)
    _grad_weight_kernel[(r_tiles, co_tiles, geometry.groups * slices)](
        x, grad_out, experts, routing, grad_experts, grad_routing, geometry.batch, *geometry.runtime_args(),
        samples_per_slice,
        KSIZE=geometry.ksize, N_PAD=triton.next_power_of_2(geometry.n_experts), DOT_PRECISION=launch.dot_precision,
        BLOCK_CO=launch.block_co, BLOCK_P=launch.block_p, BLOCK_R=launch.block_r, num_warps=launch.num_warps)
    return grad_experts.sum(0).to(experts.dtype), grad_routing.sum(0).to(routing.dtype)


class _DynGroupConvFunction(torch.autograd.Function):
    """The Triton path: no mixed kernel and no per-sample weight gradient reaches HBM (module docstring)."""

    @staticmethod
    def forward(ctx, x, experts, routing, stride, padding):
        x, experts, routing = x.contiguous(), experts.contiguous(), routing.contiguous()
        geometry = _Geometry.of(x, experts, stride, padding)
        ctx.geometry = geometry
        ctx.save_for_backward(x, experts, routing)
        return _triton_forward(x, experts, routing, geometry, _Launch.build(x, geometry))

    @staticmethod
    def backward(ctx, grad_out):
        x, experts, routing = ctx.saved_tensors
        geometry = ctx.geometry
        launch = _Launch.build(x, geometry)
        grad_out = grad_out.to(x.dtype).contiguous()
        grad_x = grad_experts = grad_routing = None
        if ctx.needs_input_grad[0]:
            grad_x = _triton_grad_input(grad_out, experts, routing, geometry, launch)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_experts, grad_routing = _triton_grad_weight(x, grad_out, experts, routing, geometry, launch)
        return grad_x, grad_experts, grad_routing, None, None


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: aggregate, then one grouped conv with the batch folded into the groups
# ---------------------------------------------------------------------------------------------


def reference_dyn_group_conv2d(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor, *,
                               stride: int = 1, padding: int = 1) -> torch.Tensor:
    """:func:`dyn_group_conv2d` by torch ops and autograd (unchecked): B·m mixed kernels materialised,
    computed in float32 (float64 for float64 inputs) whatever autocast encloses it."""
    with full_precision(x.device):
        dtype = reference_dtype(x.dtype)
        batch, in_channels, height, width = x.shape
        groups, _, out_group_channels, in_group_channels, ksize, _ = experts.shape
        mixed = torch.einsum("bge,geoikl->bgoikl", routing.to(dtype), experts.to(dtype))
        out = F.conv2d(x.to(dtype).reshape(1, batch * in_channels, height, width),
                       mixed.reshape(batch * groups * out_group_channels, in_group_channels, ksize, ksize),
                       stride=stride, padding=padding, groups=batch * groups)
        return out.reshape(batch, groups * out_group_channels, *out.shape[-2:]).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Argument checks: every bad value is named where it enters
# ---------------------------------------------------------------------------------------------


def _check_inputs(x, experts, routing, stride, padding) -> None:
    for name, tensor, dims, layout in (("x", x, 4, "[B, Cin, H, W]"),
                                       ("experts", experts, 6, "[m, n, Cout/m, Cin/m, k, k]"),
                                       ("routing", routing, 3, "[B, m, n]")):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
        if tensor.dim() != dims:
            raise ValueError(f"{name} must be {layout} ({dims} dimensions), got shape {tuple(tensor.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, tensor in (("experts", experts), ("routing", routing)):
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}, x on {x.device}")
    check_nonempty("one sample, one channel, one pixel and one expert", x=x, experts=experts, routing=routing)
    for name, value, low in (("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int ≥ {low}, got {value!r}")
    batch, in_channels, height, width = x.shape
    groups, n_experts, _, in_group_channels, ksize, ksize_w = experts.shape
    if ksize != ksize_w:
        raise ValueError(f"experts must hold square k×k kernels, got {ksize}×{ksize_w}")
    if in_channels % groups:
        raise ValueError(f"Cin = {in_channels} is not divisible by m = {groups} groups (experts.shape[0])")
    if in_group_channels != in_channels // groups:
        raise ValueError(f"experts must be [m, n, Cout/m, Cin/m = {in_channels // groups}, k, k] for Cin = "
                         f"{in_channels} and m = {groups}, got {tuple(experts.shape)}")
    if tuple(routing.shape) != (batch, groups, n_experts):
        raise ValueError(f"routing must be [B, m, n] = {(batch, groups, n_experts)}, got {tuple(routing.shape)}")
    if height + 2 * padding < ksize or width + 2 * padding < ksize:
        raise ValueError(f"a {ksize}×{ksize} kernel does not fit in the {height}×{width} input padded by {padding}")


def _triton_path(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor) -> bool:
    """The backend switch, with the Triton path's own limit named."""
    if not use_triton(x, experts, routing):
        return False
    if x.dtype == torch.float64:
        raise ValueError(f"the Triton dynamic group conv takes float16, bfloat16 or float32, got float64; "
                         f"use {ENV_VAR}=torch")
    return True


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def dyn_group_conv2d(x: torch.Tensor, experts: torch.Tensor, routing: torch.Tensor, *, stride: int = 1,
                     padding: int = 1) -> torch.Tensor:
    """Dynamic group convolution of ``x`` [B, Cin, H, W] → [B, Cout, Ho, Wo] (module docstring).

    ``experts`` [m, n, Cout/m, Cin/m, k, k] are each group's n expert kernels, ``routing`` [B, m, n]
    each sample's mixing weights per group (softmax outputs, typically; any values are accepted).
    Differentiable in all three; the result has x's dtype.
    """
    _check_inputs(x, experts, routing, stride, padding)
    if _triton_path(x, experts, routing):
        return _DynGroupConvFunction.apply(x, experts, routing, stride, padding)
    return reference_dyn_group_conv2d(x, experts, routing, stride=stride, padding=padding)


# ---------------------------------------------------------------------------------------------
# Correctness cases of the GPU suite (facekd.kernels.checks): the Triton path against the reference
# ---------------------------------------------------------------------------------------------

from facekd.kernels import checks as _checks  # noqa: E402  (after the functions the cases call)

# Output and gradients against float64, each relative to its entry and to its largest entry;
# tests/kernels/test_dyn_group_conv.py reads this table too.
TOLERANCES = {
    torch.float32: _checks.Tolerance(rtol=1e-4, atol_of_max=1e-4),
    torch.float16: _checks.Tolerance(rtol=5e-3, atol_of_max=5e-3),
    torch.bfloat16: _checks.Tolerance(rtol=3e-2, atol_of_max=3e-2),
}
# Realistic: IR-18's third stage at a 112×112 input (28×28, 128 channels), B = 128, the thesis'
# DGConv (m = 4 groups of n = 4 experts) and DC (m = 1). Tiny: odd sizes for the interpreter.
_GROUPED_REALISTIC = {"B": 128, "Cin": 128, "Cout": 128, "H": 28, "m": 4, "n": 4, "k": 3, "stride": 1}
_GROUPED_TINY = {"B": 3, "Cin": 6, "Cout": 10, "H": 7, "m": 2, "n": 3, "k": 3, "stride": 1}
_DYCONV_REALISTIC = {"B": 128, "Cin": 128, "Cout": 256, "H": 28, "m": 1, "n": 4, "k": 3, "stride": 2}
_DYCONV_TINY = {"B": 2, "Cin": 5, "Cout": 6, "H": 7, "m": 1, "n": 2, "k": 3, "stride": 2}


def _case_inputs(shape, dtype: torch.dtype, device: torch.device) -> dict:
    """x, He-scaled experts, softmax routing and a random incoming gradient, all in ``dtype``."""
    rng = _checks.generator(device)
    batch, groups, n_experts, ksize = shape["B"], shape["m"], shape["n"], shape["k"]
    in_group, out_group = shape["Cin"] // groups, shape["Cout"] // groups
    x = torch.randn(batch, shape["Cin"], shape["H"], shape["H"], device=device, generator=rng)
    experts = torch.randn(groups, n_experts, out_group, in_group, ksize, ksize, device=device, generator=rng)
    experts *= (2.0 / (in_group * ksize * ksize)) ** 0.5
    routing = torch.randn(batch, groups, n_experts, device=device, generator=rng).softmax(-1)
    out_size = (shape["H"] + 2 - ksize) // shape["stride"] + 1
    grad_out = torch.randn(batch, out_group * groups, out_size, out_size, device=device, generator=rng)
    return {"x": x.to(dtype), "experts": experts.to(dtype), "routing": routing.to(dtype),
            "grad_out": grad_out.to(dtype), "stride": shape["stride"]}


def _case_conv(inputs: dict) -> dict:
    x, experts, routing = (_checks.leaf(inputs[name]) for name in ("x", "experts", "routing"))
    out = dyn_group_conv2d(x, experts, routing, stride=inputs["stride"], padding=1)
    grads = torch.autograd.grad(out, (x, experts, routing), grad_outputs=inputs["grad_out"].to(out.dtype))
    return {"output": out.detach(), "grad_x": grads[0], "grad_experts": grads[1], "grad_routing": grads[2]}


_checks.register(
    _checks.KernelCase("dyn_group_conv/grouped", _case_inputs, _case_conv, TOLERANCES, _GROUPED_REALISTIC,
                       _GROUPED_TINY),
    _checks.KernelCase("dyn_group_conv/dyconv_stride2", _case_inputs, _case_conv, TOLERANCES, _DYCONV_REALISTIC,
                       _DYCONV_TINY),
)
