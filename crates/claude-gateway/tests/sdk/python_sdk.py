"""Drives a running claude-gateway with the official Anthropic Python SDK.

Run by tests/sdk_python.rs with GATEWAY_URL and GATEWAY_KEY set. Exits non-zero (with the
failing check's name) when anything the SDK sees is wrong.

The SDK's own retries are switched off (max_retries=0) so that a scripted 529 can only be
invisible if the gateway retried it.
"""

import os
import sys
import uuid

import anthropic

URL = os.environ["GATEWAY_URL"]
KEY = os.environ["GATEWAY_KEY"]
MODEL = "claude-sonnet-4-5"
MSG = [{"role": "user", "content": "Say hello"}]

client = anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0)
checks = []


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok   {name}")


# messages.create
m = client.messages.create(model=MODEL, max_tokens=32, messages=MSG)
check("create", m.type == "message" and m.usage.output_tokens > 0, repr(m))

# streaming
with client.messages.stream(model=MODEL, max_tokens=32, messages=MSG) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
check("stream", len(text) > 0 and final.usage.output_tokens > 0, repr(final))

# count_tokens
c = client.messages.count_tokens(model=MODEL, messages=MSG)
check("count_tokens", c.input_tokens > 0, repr(c))

# a scripted 529 then success is invisible to the SDK (which does not retry here)
m = client.messages.create(
    model=MODEL,
    max_tokens=32,
    messages=MSG,
    extra_headers={"x-mock-fault": "529,ok", "x-mock-key": str(uuid.uuid4())},
)
check("529_then_ok_invisible", m.type == "message", repr(m))

# a local rate-limit rejection raises the SDK's RateLimitError
if os.environ.get("GATEWAY_RATELIMIT_PROBE") == "1":
    raised = None
    for _ in range(int(os.environ.get("GATEWAY_RATELIMIT_TRIES", "10"))):
        try:
            client.messages.create(model=MODEL, max_tokens=32, messages=MSG)
        except anthropic.RateLimitError as e:
            raised = e
            break
    check("local_ratelimit_is_RateLimitError", raised is not None, "no RateLimitError raised")
    body = raised.body if isinstance(raised.body, dict) else {}
    msg = (body.get("error") or {}).get("message", "")
    check("local_ratelimit_says_local", "local" in msg, msg)

# a bad gateway key raises AuthenticationError
bad = anthropic.Anthropic(base_url=URL, api_key="not-a-gateway-key", max_retries=0)
try:
    bad.messages.create(model=MODEL, max_tokens=32, messages=MSG)
    check("bad_key_is_AuthenticationError", False, "no error raised")
except anthropic.AuthenticationError:
    check("bad_key_is_AuthenticationError", True)

print(f"{len(checks)} passed, 0 failed")
