"""The child interpreter that reads videos with decord (engine.video.reader runs this file's text with
`python -c`, so that a crash or hang inside decord's native code cannot take the CLI down).

It imports only json, sys, numpy and decord (torch is slow to import) and answers JSON requests
read line by line from stdin with one JSON line each.
"""

import json
import sys


def reply(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def failed(stage: str, exc: BaseException, where: str = "") -> None:
    reply(ok=False, stage=stage, error=str(exc).strip() or type(exc).__name__, where=where)


def probe(decord, path: str) -> None:
    try:
        reader = decord.VideoReader(path)
        num_frames = len(reader)
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError, RuntimeError, ...
        failed("open", exc)
        return
    if num_frames < 1:
        reply(ok=True, num_frames=num_frames, fps=0.0, width=0, height=0)
        return
    try:
        fps = float(reader.get_avg_fps())
        # decord exposes the frame size only through a decoded frame (rotation applied).
        first = reader[0].asnumpy()
    except Exception as exc:  # noqa: BLE001
        failed("decode", exc, where="frame 0")
        return
    reply(ok=True, num_frames=num_frames, fps=fps, height=int(first.shape[0]), width=int(first.shape[1]))


def decode(decord, np, path: str, indices: list, height: int, width: int, chunk: int, out: str) -> None:
    try:
        # decord scales each frame right after decoding: full-size frames never pile up.
        reader = decord.VideoReader(path, width=width, height=height)
        num_frames = len(reader)
    except Exception as exc:  # noqa: BLE001
        failed("open", exc)
        return
    if indices and max(indices) >= num_frames:
        reply(ok=False, stage="decode", where="", error=f"the file has {num_frames} frames now, frame {max(indices)} was asked for")
        return
    frames = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(indices), height, width, 3))
    for pos in range(0, len(indices), chunk):
        part = indices[pos : pos + chunk]
        where = f"frames {part[0]}-{part[-1]}"
        try:
            batch = reader.get_batch(part).asnumpy()
        except Exception as exc:  # noqa: BLE001
            failed("decode", exc, where=where)
            return
        if batch.shape != (len(part), height, width, 3) or batch.dtype != np.uint8:
            reply(ok=False, stage="decode", where=where, error=f"decord returned {batch.dtype} {tuple(batch.shape)}")
            return
        frames[pos : pos + len(part)] = batch
    frames.flush()
    del frames
    reply(ok=True)


def main() -> None:
    try:
        import decord
        import numpy as np
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        failed("import", exc)
        return
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "probe":
            probe(decord, request["path"])
        else:
            decode(decord, np, request["path"], request["indices"], request["height"], request["width"], request["chunk"], request["out"])


if __name__ == "__main__":
    main()
