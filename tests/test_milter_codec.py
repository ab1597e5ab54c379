"""The milter packets (proxsmtp/filters/miltercodec.py): every packet the
proxy writes decodes back to what was put in; the Decoder takes any bytes,
split anywhere, and raises nothing but CodecError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxsmtp.filters import miltercodec as codec
from proxsmtp.filters.milterchain import reply_text
from proxsmtp.filters.milteredit import fold, stuff, unstuff

pytestmark = pytest.mark.unit

text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
               max_size=40)
raw = st.binary(max_size=200).filter(lambda data: b"\0" not in data)


def one(data: bytes) -> tuple[bytes, bytes]:
    packets = codec.Decoder(codes=None).feed(data)
    assert len(packets) == 1
    return packets[0]


def strings(payload: bytes) -> list[bytes]:
    assert payload.endswith(b"\0") or payload == b""
    return payload.split(b"\0")[:-1]


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_optneg_round_trips(version, actions, protocol):
    code, data = one(codec.optneg(version, actions, protocol))
    assert code == codec.OPTNEG
    assert codec.parse_optneg(data) == (version, actions, protocol)


@given(text, st.sampled_from([codec.FAMILY_INET, codec.FAMILY_INET6, codec.FAMILY_UNIX]),
       st.integers(0, 65535), text)
def test_connect_round_trips(hostname, family, port, address):
    code, data = one(codec.connect(hostname, family, port, address))
    assert code == codec.CONNECT
    name, rest = data.split(b"\0", 1)
    assert name.decode() == hostname and rest[:1] == family
    assert struct.unpack("!H", rest[1:3])[0] == port
    assert rest[3:] == address.encode() + b"\0"
    assert one(codec.connect(hostname, codec.FAMILY_UNKNOWN, 0, ""))[1] == \
        hostname.encode() + b"\0U"


@given(st.lists(text, max_size=5), st.sampled_from(["mail", "rcpt"]))
def test_envelope_commands_round_trip(args, which):
    code, data = one(getattr(codec, which)(args))
    assert code == (codec.MAIL if which == "mail" else codec.RCPT)
    assert [part.decode() for part in strings(data)] == args


@given(text)
def test_helo_round_trips(name):
    code, data = one(codec.helo(name))
    assert code == codec.HELO and strings(data) == [name.encode()]


@given(raw, raw)
def test_header_round_trips(name, value):
    code, data = one(codec.header(name, value))
    assert code == codec.HEADER and codec.parse_header(data) == (name, value)


@given(st.binary(max_size=codec.BODY_CHUNK))
def test_body_round_trips(chunk):
    assert one(codec.body(chunk)) == (codec.BODY, chunk)


@given(st.dictionaries(text, text, max_size=5),
       st.sampled_from([codec.CONNECT, codec.HELO, codec.MAIL, codec.RCPT, codec.DATA,
                        codec.EOH, codec.BODYEOB]))
def test_macros_round_trip(macros, stage):
    code, data = one(codec.macro(stage, macros))
    assert code == codec.MACRO and data[:1] == stage
    flat = [part.decode() for part in strings(data[1:])]
    assert dict(zip(flat[::2], flat[1::2])) == macros


@given(st.integers(0, 2**32 - 1), raw, raw)
def test_header_changes_round_trip(index, name, value):
    for code in (codec.INSHEADER, codec.CHGHEADER):
        data = struct.pack("!I", index) + name + b"\0" + value + b"\0"
        assert one(codec.packet(code, data)) == (code, data)
        assert codec.parse_index_header(data) == (index, name, value)


@given(raw, st.one_of(st.none(), raw))
def test_chgfrom_round_trips(address, args):
    data = address + b"\0" + (args + b"\0" if args is not None else b"")
    assert codec.parse_chgfrom(data) == (address, args or b"")


@given(st.sampled_from(sorted(codec.RESPONSES)), st.binary(max_size=300))
def test_every_response_decodes(code, data):
    assert codec.Decoder().feed(codec.packet(code, data)) == [(code, data)]


def test_a_nul_is_never_sent_in_a_string():
    """It would end the string early on the milter's side."""
    assert codec.helo("a\0b") == codec.helo("ab")
    assert codec.header(b"Na\0me", b"va\0lue") == codec.header(b"Name", b"value")


@given(st.lists(st.tuples(st.sampled_from(sorted(codec.RESPONSES)), st.binary(max_size=100)),
                max_size=6), st.data())
def test_packets_split_anywhere_come_out_whole(packets, data):
    stream = b"".join(codec.packet(code, payload) for code, payload in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder, out, start = codec.Decoder(), [], 0
    for cut in cuts + [len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == packets and not decoder.buffer


@given(st.one_of(st.binary(max_size=40),
                 st.tuples(st.sampled_from(sorted(codec.RESPONSES) + [b"Z"]),
                           st.binary(max_size=40)).map(lambda packet: codec.packet(*packet))),
       st.booleans(), st.integers(1, 64))
def test_a_whole_answer_taken_at_once_is_the_packet_by_packet_split(data, any_code, limit):
    """feed's one-packet way gives what the buffered split gives, errors included."""
    def outcome(split: bool):
        decoder = codec.Decoder(limit=limit, codes=None if any_code else codec.RESPONSES)
        try:
            packets = decoder._split(data) if split else decoder.feed(data)
        except codec.CodecError as exc:
            return "error", str(exc)
        return packets, bytes(decoder.buffer)
    assert outcome(False) == outcome(True)


@given(st.lists(st.binary(max_size=64), max_size=10))
def test_the_decoder_survives_any_bytes(pieces):
    decoder = codec.Decoder(limit=1000)
    try:
        for piece in pieces:
            for code, _ in decoder.feed(piece):
                assert code in codec.RESPONSES
    except codec.CodecError:
        pass


def test_the_length_limit_and_garbage_are_errors():
    with pytest.raises(codec.CodecError):
        codec.Decoder().feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(codec.CodecError):
        codec.Decoder(limit=10).feed(codec.packet(codec.REPLBODY, b"x" * 10))
    with pytest.raises(codec.CodecError):
        codec.Decoder().feed(b"\0\0\0\0")
    with pytest.raises(codec.CodecError):
        codec.Decoder().feed(codec.packet(b"Z"))


@given(st.binary(max_size=300), st.booleans())
def test_stuffing_round_trips(block, at_start):
    assert unstuff(stuff(block, at_start), at_start) == block


@pytest.mark.parametrize("value, space, folded", [
    (b"v=1; a=rsa\n\tb=xyz", True, b" v=1; a=rsa\r\n\tb=xyz"),
    (b" one\r\n two", False, b" one\r\n two"),
    (b"one\nnot-a-field: x\n\nend", False, b"one\r\n not-a-field: x\r\n \r\n end"),
])
def test_header_values_from_milters_are_folded_with_crlf(value, space, folded):
    assert fold(value, space) == folded


@pytest.mark.parametrize("data, reply", [
    (b"554 5.7.1 no\0", b"554 5.7.1 no\r\n"),
    (b"451-4.7.1 one\r\n451 4.7.1 two\0", b"451-4.7.1 one\r\n451 4.7.1 two\r\n"),
    (b"550 5.7.1 100%% sure\0", b"550 5.7.1 100% sure\r\n"),
    (b"250 fine\0", None), (b"550 4.7.1 mixed\0", None), (b"550-one\r\n450 two\0", None),
    (b"55", None), (b"550 a\0b\0", None),
])
def test_replycode_is_checked_as_postfix_does(data, reply):
    assert reply_text(data) == reply


def _strings_one_by_one(values) -> bytes:
    """The encoding value by value, as it was before the one-join way."""
    return b"".join(codec._bytes(value) + b"\0" for value in values)


def _macro_one_by_one(stage: bytes, macros: dict) -> bytes:
    flat: list = []
    for name, value in macros.items():
        flat += (name, value)
    return codec.packet(codec.MACRO, stage + _strings_one_by_one(flat))


# Any text (NULs and lone surrogates included), bytes mixed in.
anything = st.one_of(st.text(max_size=20), st.binary(max_size=20),
                     st.sampled_from(["", "\0", "a\0b", "\udcff", b"\0", "é"]))


@given(st.lists(anything, max_size=6))
def test_strings_in_one_join_are_the_value_by_value_encoding(values):
    assert codec._strings(values) == _strings_one_by_one(values)


@given(st.dictionaries(st.text(max_size=12), anything, max_size=5),
       st.sampled_from([codec.CONNECT, codec.MAIL, codec.EOH, codec.BODYEOB]))
def test_macros_in_one_join_are_the_value_by_value_encoding(macros, stage):
    assert codec.macro(stage, macros) == _macro_one_by_one(stage, macros)


@given(st.dictionaries(st.text(max_size=12), anything, max_size=5),
       st.sampled_from([codec.EOH, codec.DATA]), st.sampled_from([codec.BODYEOB, codec.MAIL]))
def test_macros_restaged_are_those_encoded_for_the_other_stage(macros, first, then):
    assert codec.restage(codec.macro(first, macros), then) == codec.macro(then, macros)


@given(st.integers(min_value=0, max_value=0x1FFFFF),
       st.sampled_from(["connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body",
                        "eob"]))
def test_the_no_reply_masks_are_the_stage_table(protocol, stage):
    from proxsmtp.filters import milter
    _, skip, no_reply = milter.STAGES[stage]
    assert milter.NO_REPLY[stage] == skip | no_reply
    assert (not protocol & milter.NO_REPLY[stage]) == (not protocol & (skip | no_reply))
