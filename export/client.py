"""Ask a running TF Serving for NVAE samples and write them as PNG files.

    python export/client.py --server=http://localhost:8501 --model=nvae --num_samples=8 --temperature=0.7 \\
        --seed=1 --out_dir=samples/
    python export/client.py --grpc=localhost:8500 ...      # gRPC (needs: pip install tensorflow-serving-api)
    python export/client.py --print_request ...            # show the REST body and exit

REST needs only the Python standard library; the PNG files are written without TensorFlow or NumPy.
Requests are checked against the export's limits before they are sent (1 <= num_samples <= max_samples,
0 < temperature <= 2); the server checks them again.
"""

import argparse
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib

SIGNATURE = "serving_default"
MAX_TEMPERATURE = 2.0
DEFAULT_MAX_SAMPLES = 64


class RequestError(ValueError):
    """A request that the sampler would reject, or a failed call."""


def check_request(num_samples, temperature, seed, max_samples=DEFAULT_MAX_SAMPLES):
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= max_samples:
        raise RequestError(f"num_samples must be an integer in [1, {max_samples}], got {num_samples!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not 0.0 < temperature <= MAX_TEMPERATURE:
        raise RequestError(f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 63:
        raise RequestError(f"seed must be a 64-bit integer, got {seed!r}")


def rest_request(num_samples, temperature, seed, max_samples=DEFAULT_MAX_SAMPLES):
    """The JSON body of a TF Serving REST predict call to the sampler (columnar "inputs" form, scalars)."""
    check_request(num_samples, temperature, seed, max_samples)
    return {"signature_name": SIGNATURE,
            "inputs": {"num_samples": int(num_samples), "temperature": float(temperature), "seed": int(seed)}}


def predict_rest(server, model, body, version=None, timeout=600):
    """POST `body` to `<server>/v1/models/<model>[/versions/<v>]:predict`; returns the images as nested lists."""
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    request = urllib.request.Request(server.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise RequestError(f"the server refused the request ({e.code}): {detail}") from e
    except urllib.error.URLError as e:
        raise RequestError(f"cannot reach {server}: {e.reason}") from e
    outputs = reply.get("outputs")
    if isinstance(outputs, dict):
        outputs = outputs.get("images")
    if outputs is None:
        raise RequestError(f"unexpected reply: {str(reply)[:200]}")
    return outputs


def predict_grpc(target, model, num_samples, temperature, seed, version=None, timeout=600):
    """The same call over gRPC (tensorflow-serving-api); returns a NumPy array `[n, H, W, C]` uint8."""
    try:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as e:
        raise RequestError(f"gRPC needs `pip install tensorflow-serving-api` ({e})") from e
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = SIGNATURE
    if version:
        request.model_spec.version.value = int(version)
    request.inputs["num_samples"].CopyFrom(tf.make_tensor_proto(num_samples, tf.int32))
    request.inputs["temperature"].CopyFrom(tf.make_tensor_proto(temperature, tf.float32))
    request.inputs["seed"].CopyFrom(tf.make_tensor_proto(seed, tf.int64))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(target))
    try:
        reply = stub.Predict(request, timeout)
    except grpc.RpcError as e:
        raise RequestError(f"the server refused the request: {e.details()}") from e
    return tf.make_ndarray(reply.outputs["images"])


def png_bytes(image):
    """PNG file bytes of one image given as nested lists `[H][W][C]` of 0..255 (C = 1 or 3)."""
    rows = [list(row) for row in image]
    height, width = len(rows), len(rows[0])
    channels = len(rows[0][0])
    if channels not in (1, 3):
        raise RequestError(f"expected 1 or 3 channels, got {channels}")
    raw = b"".join(b"\x00" + bytes(int(v) for pixel in row for v in pixel) for row in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_pngs(images, out_dir, prefix="sample"):
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        image = image.tolist() if hasattr(image, "tolist") else image
        path = os.path.join(out_dir, f"{prefix}_{i:03d}.png")
        with open(path, "wb") as f:
            f.write(png_bytes(image))
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://localhost:8501", help="TF Serving REST address")
    parser.add_argument("--grpc", help="TF Serving gRPC address host:port (instead of REST)")
    parser.add_argument("--model", default="nvae", help="model name in TF Serving's config")
    parser.add_argument("--version", type=int, help="model version (default: the one the server serves)")
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_samples", type=int, default=DEFAULT_MAX_SAMPLES,
                        help="the export's limit (manifest.json: limits.num_samples)")
    parser.add_argument("--out_dir", default="samples")
    parser.add_argument("--print_request", action="store_true", help="print the REST body and exit")
    args = parser.parse_args(argv)
    try:
        body = rest_request(args.num_samples, args.temperature, args.seed, args.max_samples)
        if args.print_request:
            print(json.dumps(body))
            return 0
        if args.grpc:
            images = predict_grpc(args.grpc, args.model, args.num_samples, args.temperature, args.seed,
                                  args.version)
        else:
            images = predict_rest(args.server, args.model, body, args.version)
        paths = write_pngs(images, args.out_dir)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} images to {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
