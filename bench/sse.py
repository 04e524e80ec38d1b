"""Server-sent events as the OpenAI-compatible servers stream them, for the benchmark drivers."""
import json


def sse_chunks(resp):
    """Yields each `data: {...}` chunk of a streamed HTTP response as parsed JSON, until
    `data: [DONE]` or the end of the stream."""
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
