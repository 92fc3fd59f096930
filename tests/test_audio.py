"""Decoding, checks, resampling and downmixing."""

import numpy as np
import pytest

from asd.data import audio


def _tone(sr=16000, seconds=1.0, channels=1, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_decode_mono_16k_is_lossless_enough():
    wav = audio.encode_wav(_tone())
    out = audio.decode(wav)
    assert out.sample_rate == 16000 and out.wave.dtype == np.float32 and out.wave.shape == (16000,)
    assert out.warnings == []
    assert np.max(np.abs(out.wave - _tone())) < 1e-3


def test_stereo_44k_is_downmixed_and_resampled_with_warnings():
    wav = audio.encode_wav(_tone(sr=44100, seconds=2.0, channels=2, freq=1000.0), sample_rate=44100)
    out = audio.decode(wav)
    assert out.source.sample_rate == 44100 and out.source.channels == 2
    assert out.wave.shape[0] == 32000
    assert any("downmixed 2 channels" in w for w in out.warnings)
    assert any("resampled 44100 Hz" in w for w in out.warnings)
    # the 1 kHz tone survives resampling: spectral peak at 1 kHz
    spec = np.abs(np.fft.rfft(out.wave))
    assert abs(np.argmax(spec) * 16000 / len(out.wave) - 1000.0) < 5


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", audio.EMPTY),
        (b"this is a text file, not audio\n" * 10, audio.NOT_WAV),
        (b"fLaC" + b"\0" * 100, audio.NOT_WAV),
    ],
)
def test_bad_bytes(data, reason):
    with pytest.raises(audio.AudioError) as err:
        audio.decode(data)
    assert err.value.reason == reason


def test_truncated_wav():
    wav = audio.encode_wav(_tone(seconds=1.0))
    with pytest.raises(audio.AudioError) as err:
        audio.decode(wav[: len(wav) // 2])
    assert err.value.reason == audio.TRUNCATED and "declares" in str(err.value)


def test_header_only_wav_is_empty():
    wav = audio.encode_wav(np.zeros(0, dtype=np.float32))
    with pytest.raises(audio.AudioError) as err:
        audio.decode(wav)
    assert err.value.reason in (audio.EMPTY, audio.TRUNCATED)


def test_too_short():
    wav = audio.encode_wav(_tone(seconds=0.2))
    with pytest.raises(audio.AudioError) as err:
        audio.decode(wav, min_duration_s=1.0)
    assert err.value.reason == audio.TOO_SHORT and "0.200 s" in str(err.value)


def test_sha256_is_of_the_bytes():
    import hashlib

    wav = audio.encode_wav(_tone())
    assert audio.sha256(wav) == hashlib.sha256(wav).hexdigest()
