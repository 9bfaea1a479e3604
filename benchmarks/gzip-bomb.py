#!/usr/bin/env python3
"""Writes a gzip file of valid CloudTrail-shaped JSON lines of 200 KB each that expands to about
4 GB (about 8 MB compressed): hostile input for `rampart replay` (benchmarks/results/)."""
import json
import sys
import zlib

out = sys.argv[1] if len(sys.argv) > 1 else "bomb.json.gz"
total = int(sys.argv[2]) if len(sys.argv) > 2 else 4 << 30
record = {
    "eventVersion": "1.08",
    "userIdentity": {"type": "IAMUser", "arn": "arn:aws:iam::111122223333:user/big", "accountId": "111122223333"},
    "eventTime": "2026-11-01T00:00:00Z",
    "eventSource": "s3.amazonaws.com",
    "eventName": "GetObject",
    "awsRegion": "us-east-1",
    "sourceIPAddress": "10.0.0.1",
    "requestParameters": {"pad": "x" * 200000},
}
line = (json.dumps(record) + "\n").encode()
compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
with open(out, "wb") as f:
    chunk = line * 50
    for _ in range(total // len(line) // 50):
        f.write(compressor.compress(chunk))
    f.write(compressor.flush())
