"""Sealing enclave data for the device: exact round trips, any tampering or misplacement refused, unique
nonces, a key that never shows, and cost counters."""

from __future__ import annotations

import pytest
import torch

from secureinfer.crypto import seal
from secureinfer.crypto.seal import NONCE_BYTES, TAG_BYTES, SealedBlock, Sealer
from secureinfer.errors import IntegrityError, SecureInferError

PLACE = {"layer": 3, "start": 128, "kind": "k"}


def special_floats() -> torch.Tensor:
    """float32 whose bits matter: NaNs with payloads and signs, infinities, -0.0, subnormals, extremes."""
    nans = [0x7FC00000, 0x7FC00001, 0x7F800001, 0xFFC00000, 0xFFFFFFFF]
    others = [0x7F800000, 0xFF800000, 0x80000000, 0, 1, 0x807FFFFF, 0x7F7FFFFF, 0x3F800000]  # +-inf, -0.0, ...
    ints = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in nans + others], dtype=torch.int32)
    rest = torch.randint(-(2**31), 2**31 - 1, (1024 - len(ints),), dtype=torch.int32)
    return torch.cat([ints, rest]).view(torch.float32).view(8, 2, 64)


def test_round_trip_is_bit_exact():
    sealer = Sealer()
    x = special_floats()
    back = sealer.open(sealer.seal(x, **PLACE), **PLACE)
    assert back.dtype == torch.float32 and back.shape == x.shape
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))
    others = [
        x.transpose(0, 2),  # not contiguous
        torch.randn(4, 5).to(torch.bfloat16),
        torch.randn(3).half(),
        torch.randint(-(2**62), 2**62, (2, 3)),
        torch.tensor([True, False, True]),
        torch.tensor(2.5),
        torch.zeros(0, 4),
    ]
    for t in others:
        back = sealer.open(sealer.seal(t, **PLACE), **PLACE)
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))


def test_block_is_tensors_and_hides_the_data():
    sealer = Sealer()
    x = torch.arange(64, dtype=torch.float32)
    block = sealer.seal(x, **PLACE)
    assert block.ciphertext.dtype == torch.uint8 and block.ciphertext.shape == (x.nbytes + TAG_BYTES,)
    assert block.nonce.dtype == torch.uint8 and block.nonce.shape == (NONCE_BYTES,)
    assert (block.dtype, block.shape) == (torch.float32, (64,))
    assert x.numpy().tobytes()[4:36] not in block.ciphertext.numpy().tobytes()


def flipped(t: torch.Tensor, index: int) -> torch.Tensor:
    t = t.clone()
    t[index] ^= 1
    return t


def test_any_tampering_or_misplacement_is_refused():
    sealer = Sealer()
    x = torch.randn(4, 6)
    block = sealer.seal(x, **PLACE)
    other = sealer.seal(torch.randn(4, 6), layer=3, start=132, kind="k")
    forged = [
        *(SealedBlock(flipped(block.ciphertext, i), block.nonce, block.dtype, block.shape) for i in (0, 50, -1)),
        *(SealedBlock(block.ciphertext, flipped(block.nonce, i), block.dtype, block.shape) for i in (0, 5, -1)),
        SealedBlock(block.ciphertext[:-1], block.nonce, block.dtype, block.shape),
        SealedBlock(block.ciphertext[:10], block.nonce, block.dtype, block.shape),
        SealedBlock(block.ciphertext, block.nonce[:8], block.dtype, block.shape),
        SealedBlock(block.ciphertext, block.nonce, block.dtype, (6, 4)),
        SealedBlock(block.ciphertext, block.nonce, block.dtype, (24,)),
        SealedBlock(block.ciphertext, block.nonce, torch.int32, block.shape),
        SealedBlock(block.ciphertext.view(torch.int8), block.nonce, block.dtype, block.shape),
        SealedBlock(other.ciphertext, block.nonce, block.dtype, block.shape),  # parts of two blocks mixed
        other,  # a whole block swapped in from another position
        Sealer().seal(x, **PLACE),  # another session's block for the same place
    ]
    for bad in forged:
        with pytest.raises(IntegrityError, match="layer 3 at position 128"):
            sealer.open(bad, **PLACE)
    for place in ({"layer": 4}, {"start": 129}, {"kind": "v"}):
        with pytest.raises(IntegrityError, match="failed authentication") as err:
            sealer.open(block, **{**PLACE, **place})
        assert "prefilled again" in err.value.fix
    assert torch.equal(sealer.open(block, **PLACE), x)  # the genuine block still opens


def test_nonces_never_repeat_and_the_counter_cannot_wrap():
    sealer = Sealer()
    x = torch.zeros(1)
    nonces = {sealer.seal(x, layer=i % 7, start=i, kind="v").nonce.numpy().tobytes() for i in range(20000)}
    assert len(nonces) == 20000
    sealer._counter = 2**64 - 1
    last = sealer.seal(x, **PLACE)
    assert torch.equal(sealer.open(last, **PLACE), x)
    with pytest.raises(SecureInferError, match="2\\^64"):
        sealer.seal(x, **PLACE)


class RecordingAESGCM:
    """Stands in for AESGCM to learn the key the Sealer draws, then hands back the real cipher."""

    keys: list[bytes] = []

    @staticmethod
    def generate_key(bit_length: int) -> bytes:
        RecordingAESGCM.keys.append(seal.AESGCM_REAL.generate_key(bit_length=bit_length))
        return RecordingAESGCM.keys[-1]

    def __new__(cls, key: bytes):
        return seal.AESGCM_REAL(key)


def test_key_is_256_bits_fresh_and_never_shown(monkeypatch):
    monkeypatch.setattr(seal, "AESGCM_REAL", seal.AESGCM, raising=False)
    monkeypatch.setattr(seal, "AESGCM", RecordingAESGCM)
    RecordingAESGCM.keys.clear()
    sealers = [Sealer(), Sealer()]
    assert [len(k) for k in RecordingAESGCM.keys] == [32, 32] and RecordingAESGCM.keys[0] != RecordingAESGCM.keys[1]
    for sealer, key in zip(sealers, RecordingAESGCM.keys):
        shown = repr(sealer) + str(sealer)
        assert key.hex() not in shown and repr(key) not in shown
        assert key not in [value for value in vars(sealer).values() if isinstance(value, bytes)]


def test_stats_count_blocks_bytes_and_time():
    sealer = Sealer()
    blocks = [sealer.seal(torch.zeros(10, 16), layer=i, start=0, kind="v") for i in range(3)]
    sealer.open(blocks[1], layer=1, start=0, kind="v")
    stats = sealer.seal_stats
    assert (stats.blocks_sealed, stats.bytes_sealed, stats.blocks_opened, stats.bytes_opened) == (3, 3 * 640, 1, 640)
    assert stats.seal_s > 0 and stats.open_s > 0
    assert "blocks_sealed=3" in repr(sealer)
