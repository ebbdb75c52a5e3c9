"""Verifies a Sigil JWT-SVID the way a relying party does, with PyJWT from PyPI: reads the
OIDC discovery document over https, fetches its jwks_uri, and checks the token's signature,
issuer (the discovery document's) and audience. Prints the token's subject; exits non-zero on
any error.

Usage: python pyjwt_check.py DISCOVERY_URL CA_FILE TOKEN AUDIENCE
"""
import json
import ssl
import sys
import urllib.request

import jwt


def main() -> None:
    discovery_url, ca_file, token, audience = sys.argv[1:5]
    tls = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(discovery_url, context=tls) as r:
        doc = json.load(r)
    with urllib.request.urlopen(doc["jwks_uri"], context=tls) as r:
        keys = jwt.PyJWKSet.from_dict(json.load(r))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=doc["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=doc["issuer"],
    )
    print(claims["sub"])


if __name__ == "__main__":
    main()
