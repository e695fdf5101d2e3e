"""Container health check: exit 0 when grpc.health.v1.Health/Check on the gRPC port says SERVING.

Used by the images' HEALTHCHECK (`python /home/ray/healthcheck.py [HOST:PORT]`, default
127.0.0.1:9000). LeanServer answers SERVING once its model is loaded and the engine runs.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = argv[1] if len(argv) > 1 else "127.0.0.1:9000"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
