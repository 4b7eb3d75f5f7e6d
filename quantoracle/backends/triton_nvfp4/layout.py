"""The weight layout the Triton NVFP4 kernels read, made once by ``prepare`` from the checkpoint's.

Checkpoint (ModelOpt): codes uint8 ``[*lead, R, K/2]`` (element 2i in the low nibble) and block
scales float8_e4m3fn ``[*lead, R, K/16]``. The kernels want instead (:func:`relayout`):

- **words** int32 ``[*lead, ceil(R/16), Kp/128, 16, 16]``, Kp = K rounded up to a multiple of
  :data:`CHUNK_K` (128; the padding holds code 0, so it adds nothing): tiles of 16 rows x one
  128-element chunk, each 1 KiB contiguous (whole DRAM bursts for the 16 rows' 64 bytes of a
  chunk), row blocks outermost. Within a tile, row ``r`` holds 16 words; nibble ``j`` (bits
  ``4j..4j+3``) of word ``w`` is the code of element ``k = 128c + 16j + w``. A kernel loads one
  chunk as a ``[rows, 16]`` word tile and splits it with whole-word shifts and masks into eight
  ``[rows, 16]`` sub-tiles, sub-tile ``j`` being exactly the 16-element scale block ``8c + j``:
  no nibble interleaving to undo (no join/reshape), one scale per row per sub-tile, two codes
  decoded per 32-bit operation (nibbles ``j`` and ``j + 4`` share the 16-bit halves of a word).
- **scales** int64 ``[*lead, Kp/128, R]``: the eight block scales of one row's chunk in one
  8-byte word (byte ``j`` = block ``8c + j``), chunk-major, so a tile's scales for one chunk are
  one contiguous, pipelinable load of 8 bytes per row. Each byte is the scale re-encoded as a
  normalized float with a 5-bit exponent biased by 9 and the 3 mantissa bits of e4m3
  (:func:`encode_scale`): every positive e4m3 value, subnormals included, fits, and a kernel
  turns it into ``s * 2^fold`` in bf16 or fp16 with one shift-and-add of the bits
  (``(byte << 4) + 0x7600`` is bf16 ``s * 2^118``, ``(byte << 7) + 0x3400`` fp16 ``s * 2^7``).
  Blocks whose checkpoint scale is zero get their codes zeroed (scale byte of 1.0); a negative
  scale flips its block's code signs. Both are exact. Padding blocks hold 1.0.

Both keep NVFP4's 4.5 bits per weight (plus the K padding, none when K % 128 == 0).
"""

from __future__ import annotations

import torch

from quantoracle.errors import NumericsError

CHUNK_K = 128
"""Elements of K per word tile: 16 words of 8 codes; eight 16-element scale blocks."""
ROW_BLOCK = 16
"""Rows per contiguous tile of the word layout."""

WORDS_PER_CHUNK = CHUNK_K // 8
SUBTILES = CHUNK_K // 16
SCALE_EXPONENT_BIAS = 9
"""2^-9 (the smallest e4m3 subnormal) encodes as exponent 0."""
_ONE = SCALE_EXPONENT_BIAS << 3  # the kernel scale byte of 1.0


def padded_k(k: int) -> int:
    """K rounded up to a multiple of :data:`CHUNK_K`."""
    return -(-k // CHUNK_K) * CHUNK_K


def encode_scale(scale: torch.Tensor) -> torch.Tensor:
    """uint8 kernel scale bytes ``(exponent + 9) << 3 | mantissa`` of positive float8_e4m3fn
    scales (``scale = 2^exponent * (1 + mantissa / 8)``), same shape."""
    mantissa, exponent = torch.frexp(scale.float())  # scale = mantissa * 2^exponent, m in [.5, 1)
    fraction = (mantissa * 16 - 8).to(torch.int32)  # exact: e4m3 values have 4 significant bits
    return (((exponent - 1 + SCALE_EXPONENT_BIAS) << 3) | fraction).to(torch.uint8)


def decode_scale(byte: torch.Tensor) -> torch.Tensor:
    """float32 values of kernel scale bytes: the inverse of :func:`encode_scale`."""
    b = byte.to(torch.int32)
    return torch.ldexp(1 + (b & 7).float() / 8, (b >> 3) - SCALE_EXPONENT_BIAS)


def _relayout_matrix(packed: torch.Tensor, block_scale: torch.Tensor):
    """(words int32 ``[R, Kp/8]``, scales int64 ``[Kp/128, R]``) of one matrix."""
    rows, half_k = packed.shape
    kp = padded_k(2 * half_k)
    scale = block_scale.float()
    if bool(scale.isnan().any()):
        raise NumericsError(
            "block_scale holds NaN (bytes 0x7F/0xFF): the checkpoint was exported from an "
            "all-zero or corrupt weight; re-export it"
        )
    codes = torch.zeros(rows, kp, dtype=torch.uint8, device=packed.device)
    codes[:, 0 : 2 * half_k : 2] = packed & 0x0F
    codes[:, 1 : 2 * half_k : 2] = packed >> 4
    blocks = codes.view(rows, kp // 16, 16)[:, : scale.shape[1]]
    blocks.mul_((scale != 0).to(torch.uint8).unsqueeze(-1))  # a zero scale zeroes its block
    blocks.bitwise_xor_(((scale < 0).to(torch.uint8) << 3).unsqueeze(-1))  # |s|, flipped codes
    scale_bytes = torch.full((rows, kp // 16), _ONE, dtype=torch.uint8, device=packed.device)
    scale_bytes[:, : scale.shape[1]] = encode_scale(torch.where(scale == 0, 1.0, scale.abs()))
    # [R, chunk, j, w] -> [R, chunk, w, j]: word w of a chunk gathers nibble j of every sub-tile.
    codes = codes.view(rows, kp // CHUNK_K, SUBTILES, WORDS_PER_CHUNK).transpose(-1, -2)
    # Byte b of a word holds nibbles 2b (low) and 2b + 1 (high); little-endian bytes -> int32.
    word_bytes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    words = word_bytes.contiguous().view(torch.int32).reshape(rows, kp // 8)
    scales = scale_bytes.view(rows, kp // CHUNK_K, SUBTILES).transpose(0, 1)
    return words, scales.contiguous().view(torch.int64).squeeze(-1)


def relayout(packed: torch.Tensor, block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel ``(words, scales)`` (see the module docstring) from checkpoint codes uint8
    ``[*lead, R, K/2]`` and block scales float8_e4m3fn ``[*lead, R, K/16]``, one matrix at a
    time (bounded temporaries). Raises NumericsError for NaN block scales."""
    lead, (rows, half_k) = packed.shape[:-2], packed.shape[-2:]
    chunks = padded_k(2 * half_k) // CHUNK_K
    blocks = -(-rows // ROW_BLOCK)
    flat_packed = packed.reshape(-1, rows, half_k)
    flat_scale = block_scale.reshape(-1, rows, block_scale.shape[-1])
    count = flat_packed.shape[0]
    words = torch.zeros(count, blocks * ROW_BLOCK, chunks * WORDS_PER_CHUNK, dtype=torch.int32,
                        device=packed.device)
    scales = torch.empty(count, chunks, rows, dtype=torch.int64, device=packed.device)
    for i in range(count):
        words[i, :rows], scales[i] = _relayout_matrix(flat_packed[i], flat_scale[i])
    tiles = words.view(count, blocks, ROW_BLOCK, chunks, WORDS_PER_CHUNK).transpose(2, 3)
    return (tiles.contiguous().reshape(*lead, blocks, chunks, ROW_BLOCK, WORDS_PER_CHUNK),
            scales.reshape(*lead, chunks, rows))


def unpack_words(words: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """uint8 codes ``[*lead, R, K]`` back from kernel words (the inverse of the word layout),
    for tests and debugging."""
    lead, (blocks, chunks) = words.shape[:-4], words.shape[-4:-2]
    row_major = words.transpose(-2, -3).reshape(*lead, blocks * ROW_BLOCK, chunks, WORDS_PER_CHUNK)
    word_bytes = row_major.contiguous().view(torch.uint8).unflatten(-1, (WORDS_PER_CHUNK, 4))
    nibbles = torch.stack((word_bytes & 0x0F, word_bytes >> 4), dim=-1).flatten(-2)  # [.., w, j]
    codes = nibbles.transpose(-1, -2).reshape(*lead, blocks * ROW_BLOCK, chunks * CHUNK_K)
    return codes[..., :rows, :k]


def unpack_scales(scales: torch.Tensor, k: int) -> torch.Tensor:
    """float32 block scales ``[*lead, R, K/16]`` back from kernel scale words."""
    raw = scales.contiguous().view(torch.uint8)  # [*lead, Kp/128, R * 8]
    raw = raw.unflatten(-1, (-1, SUBTILES)).transpose(-2, -3).flatten(-2)  # [*lead, R, Kp/16]
    return decode_scale(raw[..., : k // 16])
