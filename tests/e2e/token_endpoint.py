"""An OAuth token endpoint for service-account keys, run on loopback inside the test's network
namespace: it verifies the RS256 JWT bearer assertion (signature with `openssl`, and the
`iss`, `scope`, `aud`, `iat`/`exp` claims) and only then hands out an access token.

    python3 token_endpoint.py HOST PORT PUBLIC_KEY CLIENT_EMAIL RESULTS_FILE

Each exchange appends one JSON line (`{"problems": [...]}`) to RESULTS_FILE.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse

SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCESS_TOKEN = "ya29.e2e-access-token"


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify(form: dict, public_key: str, email: str, token_uri: str) -> list[str]:
    if form.get("grant_type") != [GRANT]:
        return [f"grant_type {form.get('grant_type')!r}"]
    try:
        header_b64, claims_b64, sig_b64 = form["assertion"][0].split(".")
        header = json.loads(b64url_decode(header_b64))
        claims = json.loads(b64url_decode(claims_b64))
        signature = b64url_decode(sig_b64)
    except (KeyError, ValueError):
        return ["assertion is not a JWT"]
    problems = []
    if header.get("alg") != "RS256":
        problems.append(f"alg {header.get('alg')!r}")
    with tempfile.NamedTemporaryFile() as sig:
        sig.write(signature)
        sig.flush()
        check = subprocess.run(["openssl", "dgst", "-sha256", "-verify", public_key, "-signature", sig.name],
                               input=f"{header_b64}.{claims_b64}".encode(), capture_output=True, timeout=30)
    if check.returncode != 0:
        problems.append("signature does not verify")
    for claim, want in (("iss", email), ("scope", SCOPE), ("aud", token_uri)):
        if claims.get(claim) != want:
            problems.append(f"{claim} {claims.get(claim)!r}")
    iat, exp, now = claims.get("iat", 0), claims.get("exp", 0), time.time()
    if exp - iat != 3600 or not iat - 60 <= now <= exp:
        problems.append(f"iat/exp {iat}/{exp}")
    return problems


def main() -> None:
    host, port, public_key, email, results = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    token_uri = f"http://{host}:{port}/token"

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ARG002 - results go to the results file
            pass

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            problems = verify(urllib.parse.parse_qs(body), public_key, email, token_uri) \
                if self.path == "/token" else [f"path {self.path}"]
            with open(results, "a") as out:
                out.write(json.dumps({"problems": problems}) + "\n")
            if problems:
                status, answer = 400, {"error": "invalid_grant", "error_description": "; ".join(problems)}
            else:
                status, answer = 200, {"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()


if __name__ == "__main__":
    main()
