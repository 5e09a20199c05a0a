#!/usr/bin/env python3
"""A minimal hexveil client in Python (grpcio), as shown in the README.

Usage: python3 tests/clients/example.py [HOST:PORT]
Needs: pip install grpcio grpcio-tools grpcio-reflection
Compiles the protos from proto/ on the fly, grants consent, reads it back, shows what the
server holds and the live privacy policy, lists the services over reflection (v1alpha, the
dialect grpcio-reflection speaks), then erases the device again.
"""
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")


def load_stubs():
    out = tempfile.mkdtemp(prefix="hexveil-py-")
    files = [os.path.join("hexveil", "v1", f) for f in sorted(os.listdir(os.path.join(PROTO, "hexveil", "v1")))]
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        sys.exit(f"protoc failed: {rc}")
    sys.path.insert(0, out)


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    load_stubs()
    from hexveil.v1 import common_pb2, consent_pb2, consent_pb2_grpc, transparency_pb2, transparency_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(target)
    consent = consent_pb2_grpc.ConsentServiceStub(channel)
    transparency = transparency_pb2_grpc.TransparencyServiceStub(channel)
    token = "example-device-0123456789"

    receipt = consent.SetConsent(consent_pb2.SetConsentRequest(
        device_token=token,
        purposes=[common_pb2.PURPOSE_NEARBY_OFFERS, common_pb2.PURPOSE_FOOT_TRAFFIC],
        policy_version="1"))
    print("receipt", receipt.receipt_id, "principal", receipt.principal_id)
    assert consent.GetConsent(consent_pb2.GetConsentRequest(device_token=token)).receipt_id == receipt.receipt_id

    mine = transparency.GetMyData(transparency_pb2.GetMyDataRequest(device_token=token))
    print("receipts held:", len(mine.receipts), "deleted if idle after", mine.retention_deadline.ToJsonString())

    policy = transparency.GetPrivacyPolicy(transparency_pb2.GetPrivacyPolicyRequest())
    print("epsilon per device per day:", round(policy.privacy.epsilon_per_device_per_day, 3))
    print(policy.summary)

    try:
        consent.SetConsent(consent_pb2.SetConsentRequest(device_token="bad", policy_version="1"))
        sys.exit("a bad token was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.code()
        print("bad input refused:", e.details())

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    services = sorted(s.name for s in reply.list_services_response.service)
    print("services:", ", ".join(services))
    assert "hexveil.v1.ConsentService" in services and "hexveil.v1.TransparencyService" in services

    erased = transparency.ForgetMe(transparency_pb2.ForgetMeRequest(device_token=token))
    print("erased records:", erased.records_erased)
    try:
        consent.GetConsent(consent_pb2.GetConsentRequest(device_token=token))
        sys.exit("consent still there after ForgetMe")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    print("OK")


if __name__ == "__main__":
    main()
