"""JSON the way the Mattermost server (Go's encoding/json) writes and reads it.

Why this exists: a client that parses the emulator's output must also parse the real server's, so
the emulator reproduces the encoder's visible habits instead of Python's:

- Go structs keep their declared field order; Go maps (props, WebSocket `data`, ...) are written
  with keys sorted. Here a `Struct` (an ordered dict) is a Go struct and any other dict a Go map.
- Strings escape `<`, `>`, `&`, U+2028 and U+2029 as `\\u003c` etc. (HTML-safe escaping is on by
  default in Go) and write other non-ASCII characters as raw UTF-8.
- Numbers inside `map[string]any` (post props) were decoded into float64: integers above 2^53
  lose precision and floats are printed in Go's shortest form (`1e+21`, `1e-7`, `100`).

Decoding mirrors the server too: `decode_props` turns every number inside props into a float, as
Go does, and rejects numbers that do not fit a float64.
"""
import json
import math
from decimal import Decimal


class Struct(dict):
    """A Go struct: keys are written in insertion (declaration) order, never sorted."""


class Raw(str):
    """Pre-encoded JSON text inserted verbatim."""


_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
            "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_str(s):
    out = json.dumps(s, ensure_ascii=False)
    if any(ch in out for ch in _ESCAPES):
        for ch, rep in _ESCAPES.items():
            out = out.replace(ch, rep)
    return out


def go_float(f):
    """strconv.AppendFloat(f, 'f' or 'e', -1, 64) as encoding/json chooses it."""
    if math.isnan(f) or math.isinf(f):
        raise ValueError("json: unsupported value: %r" % f)
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    a = abs(f)
    if a < 1e-6 or a >= 1e21:
        s = repr(f)  # shortest round-trip digits, exponent with at least two digits
        if "e" not in s:
            s = "%e" % f  # not reached for finite floats in this range, kept for safety
        mant, exp = s.split("e")
        sign = exp[0] if exp[0] in "+-" else "+"
        digits = exp.lstrip("+-").lstrip("0") or "0"
        if len(digits) < 2 and sign == "+":
            digits = digits.rjust(2, "0")
        # Go cleans "e-07" to "e-7" but keeps "e+21".
        return "%se%s%s" % (mant, sign, digits)
    text = format(Decimal(repr(f)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _encode(o, out):
    if o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, Raw):
        out.append(str(o))
    elif isinstance(o, str):
        out.append(go_str(o))
    elif isinstance(o, int):
        out.append(str(o))
    elif isinstance(o, float):
        out.append(go_float(o))
    elif isinstance(o, Struct):
        out.append("{")
        first = True
        for k, v in o.items():
            if not first:
                out.append(",")
            first = False
            out.append(go_str(k))
            out.append(":")
            _encode(v, out)
        out.append("}")
    elif isinstance(o, dict):
        out.append("{")
        first = True
        for k in sorted(o):
            if not first:
                out.append(",")
            first = False
            out.append(go_str(str(k)))
            out.append(":")
            _encode(o[k], out)
        out.append("}")
    elif isinstance(o, (list, tuple)):
        out.append("[")
        for i, v in enumerate(o):
            if i:
                out.append(",")
            _encode(v, out)
        out.append("]")
    elif isinstance(o, (bytes, bytearray)):
        import base64
        out.append('"%s"' % base64.b64encode(bytes(o)).decode("ascii"))
    else:
        raise TypeError("cannot encode %r" % type(o))


def dumps(o):
    """json.Marshal(o)."""
    out = []
    _encode(o, out)
    return "".join(out)


def dumps_encoder(o):
    """json.NewEncoder(w).Encode(o): Marshal plus a trailing newline."""
    return dumps(o) + "\n"


class DecodeError(ValueError):
    pass


def loads(data):
    """Decode a request body. Invalid UTF-8 becomes U+FFFD, as Go's decoder does."""
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("utf-8", errors="replace")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise DecodeError(str(e))


def to_go_any(v):
    """A value decoded into `any` by Go: every number becomes a float64."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        try:
            f = float(v)
        except OverflowError:
            raise DecodeError("json: cannot unmarshal number %s into Go value of type float64" % v)
        if math.isinf(f):
            raise DecodeError("json: cannot unmarshal number into Go value of type float64")
        return f
    if isinstance(v, list):
        return [to_go_any(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_go_any(x) for k, x in v.items()}
    return v


def decode_props(v):
    """Post.Props (model.StringInterface = map[string]any): null stays None, objects are maps."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise DecodeError("json: cannot unmarshal %s into Go struct field Post.props of type "
                          "model.StringInterface" % type(v).__name__)
    return to_go_any(v)
