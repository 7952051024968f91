"""Pure framing tests of the agent wire protocol."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from branchbox.agent import wire

frames_st = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=wire.WINDOW),
        st.integers(min_value=0, max_value=2**32 - 1),
        st.binary(max_size=2048),
    ),
    max_size=20,
)


@given(frames=frames_st, cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12))
def test_round_trip_with_arbitrary_splits(frames: list[wire.Frame], cuts: list[int]) -> None:
    stream = b"".join(wire.encode(k, c, p) for k, c, p in frames)
    points = sorted({min(x, len(stream)) for x in cuts})
    parser = wire.FrameParser()
    out: list[wire.Frame] = []
    start = 0
    for point in [*points, len(stream)]:
        out.extend(parser.feed(stream[start:point]))
        start = point
    assert out == frames
    assert parser.buffered == 0


@given(frames=frames_st)
def test_byte_by_byte_feed(frames: list[wire.Frame]) -> None:
    stream = b"".join(wire.encode(k, c, p) for k, c, p in frames)
    parser = wire.FrameParser()
    out: list[wire.Frame] = []
    for i in range(len(stream)):
        out.extend(parser.feed(stream[i : i + 1]))
    assert out == frames


@given(channel=st.integers(min_value=0, max_value=2**32 - 1), stream=st.sampled_from([0, 1, 2]), data=st.binary())
def test_data_and_eof_helpers(channel: int, stream: int, data: bytes) -> None:
    parser = wire.FrameParser()
    frames = parser.feed(wire.encode_data(channel, stream, data) + wire.encode_eof(channel, stream))
    assert frames[0][:2] == (wire.DATA, channel)
    assert wire.split_stream(frames[0][2]) == (stream, data)
    assert frames[1][:2] == (wire.EOF, channel)
    assert wire.split_stream(frames[1][2]) == (stream, b"")


@given(
    obj=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_json_round_trip(obj: object) -> None:
    ((kind, channel, payload),) = wire.FrameParser().feed(wire.encode_json(wire.CALL, 7, obj))
    assert (kind, channel) == (wire.CALL, 7)
    assert wire.decode_json(payload) == obj


@given(credit=st.integers(min_value=0, max_value=2**32 - 1))
def test_window_round_trip(credit: int) -> None:
    ((kind, channel, payload),) = wire.FrameParser().feed(wire.encode_window(3, credit))
    assert (kind, channel) == (wire.WINDOW, 3)
    assert wire.decode_window(payload) == credit


def test_max_payload_is_accepted() -> None:
    frame = wire.encode(wire.DATA, 1, b"x" * wire.MAX_PAYLOAD)
    assert wire.FrameParser().feed(frame) == [(wire.DATA, 1, b"x" * wire.MAX_PAYLOAD)]


def test_oversize_frame_rejected_from_header_alone() -> None:
    header = wire.HEADER.pack(wire.MAX_PAYLOAD + 1, wire.DATA, 1)
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.FrameParser().feed(header)


def test_oversize_payload_not_encoded() -> None:
    with pytest.raises(wire.ProtocolError):
        wire.encode(wire.DATA, 1, b"x" * (wire.MAX_PAYLOAD + 1))
    with pytest.raises(wire.ProtocolError):
        wire.encode_data(1, wire.STDOUT, b"x" * wire.MAX_PAYLOAD)


def test_unknown_kind_rejected() -> None:
    with pytest.raises(wire.ProtocolError, match="kind"):
        wire.FrameParser().feed(wire.HEADER.pack(0, 99, 1))


def test_bad_payloads_rejected() -> None:
    with pytest.raises(wire.ProtocolError):
        wire.decode_json(b"{not json")
    with pytest.raises(wire.ProtocolError):
        wire.decode_window(b"\x00\x01")
    with pytest.raises(wire.ProtocolError):
        wire.split_stream(b"")
    with pytest.raises(wire.ProtocolError):
        wire.split_stream(b"\x07abc")


def test_partial_header_is_buffered() -> None:
    frame = wire.encode_json(wire.HELLO, 0, {"protocol": 1})
    parser = wire.FrameParser()
    assert parser.feed(frame[:5]) == []
    assert parser.buffered == 5
    assert parser.feed(frame[5:]) == [(wire.HELLO, 0, frame[wire.HEADER_SIZE :])]
