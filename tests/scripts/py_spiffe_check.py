"""Drives Sigil's Workload API with py-spiffe (the SPIFFE project's Python library, from PyPI),
unmodified. Prints one JSON object with what it fetched; exits non-zero on any error.

Usage: python py_spiffe_check.py unix:///path/to/workload.sock AUDIENCE
"""
import json
import sys

from spiffe import WorkloadApiClient


def main() -> None:
    socket, audience = sys.argv[1], sys.argv[2]
    client = WorkloadApiClient(socket_path=socket, default_timeout=10)
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    jwt = client.fetch_jwt_svid(audience={audience})
    checked = client.validate_jwt_svid(jwt.token, audience)
    jwt_bundles = client.fetch_jwt_bundles()
    td = svid.spiffe_id.trust_domain
    print(json.dumps({
        "x509_spiffe_id": str(svid.spiffe_id),
        "chain_len": len(svid.cert_chain),
        "x509_authorities": len(bundles.get_bundle_for_trust_domain(td).x509_authorities),
        "jwt_spiffe_id": str(jwt.spiffe_id),
        "jwt_audience": sorted(jwt.audience),
        "validated_spiffe_id": str(checked.spiffe_id),
        "jwt_authorities": len(jwt_bundles.get_bundle_for_trust_domain(td).jwt_authorities),
    }))
    client.close()


if __name__ == "__main__":
    main()
