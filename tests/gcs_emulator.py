"""Runs a command against a GCS emulator on 127.0.0.1, reached by TensorFlow's own gs:// client.

  unshare --mount --net python gcs_emulator.py COMMAND [ARG...]

TensorFlow's GCS filesystem has its endpoints built in (https://www.googleapis.com and
https://storage.googleapis.com) and does not use proxies. So this runs in a mount and network
namespace of its own (`unshare`, as root), where those names resolve to 127.0.0.1 through a
hosts file bound over /etc/hosts; TLS on port 443 (a certificate made here with openssl and
trusted through CURL_CA_BUNDLE) and plain HTTP on port 80 (where the emulator's resumable
uploads continue) are forwarded to gcp-storage-emulator with one bucket, `bucket`. No token is
fetched (GOOGLE_AUTH_TOKEN_FOR_TESTING). Two gaps of the emulator are mended here: TensorFlow
uploads with both `Transfer-Encoding: chunked` and a `Content-Length`, which the emulator must
read as chunked; and an empty upload (TensorFlow's directory markers) is an empty object.

COMMAND runs with that environment; this exits with its status.
"""

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading


BUCKET = "bucket"
HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def _mend_the_emulator():
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  read_raw_data = server._read_raw_data  # pylint: disable=protected-access

  def read_chunked_first(handler):
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
      content_length = handler.headers.get("Content-Length")
      del handler.headers["Content-Length"]
      try:
        return read_raw_data(handler)
      finally:
        if content_length is not None:
          handler.headers["Content-Length"] = content_length
    return read_raw_data(handler)

  server._read_raw_data = read_chunked_first  # pylint: disable=protected-access
  media_upload = objects._media_upload  # pylint: disable=protected-access

  def empty_upload_is_an_empty_object(request, response, storage):
    if request.data is None:
      request._data = b""  # pylint: disable=protected-access
    return media_upload(request, response, storage)

  objects._media_upload = empty_upload_is_an_empty_object  # pylint: disable=protected-access
  return server


def _pipe(source, destination):
  try:
    while True:
      data = source.recv(1 << 16)
      if not data:
        break
      destination.sendall(data)
  except OSError:
    pass
  finally:
    for s in (source, destination):
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass


def _forward(port, target_port, context=None):
  """Accepts connections on 127.0.0.1:port (TLS with `context`) and relays them."""
  listener = socket.socket()
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  listener.bind(("127.0.0.1", port))
  listener.listen(64)

  def serve(client):
    try:
      if context is not None:
        client = context.wrap_socket(client, server_side=True)
      upstream = socket.create_connection(("127.0.0.1", target_port))
    except OSError:
      client.close()
      return
    threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
    _pipe(upstream, client)

  def accept():
    while True:
      client, _ = listener.accept()
      threading.Thread(target=serve, args=(client,), daemon=True).start()

  threading.Thread(target=accept, daemon=True).start()


def main(command):
  scratch = tempfile.mkdtemp(prefix="gcs-emulator-")
  subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
  hosts = os.path.join(scratch, "hosts")
  with open(hosts, "w") as f:
    f.write("127.0.0.1 localhost " + " ".join(HOSTS) + "\n")
  subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
  certificate, key = os.path.join(scratch, "cert.pem"), os.path.join(scratch, "key.pem")
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                  "-keyout", key, "-out", certificate, "-subj", f"/CN={HOSTS[0]}",
                  "-addext", "subjectAltName=" + ",".join(f"DNS:{h}" for h in HOSTS),
                  "-addext", "basicConstraints=critical,CA:TRUE"],
                 check=True, capture_output=True)
  server = _mend_the_emulator()
  emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
  emulator.start()
  emulator_port = emulator._api._httpd.server_address[1]  # pylint: disable=protected-access
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(certificate, key)
  _forward(443, emulator_port, context)
  _forward(80, emulator_port)
  environment = dict(os.environ, CURL_CA_BUNDLE=certificate,
                     GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", NO_GCE_CHECK="true",
                     GCS_RETRY_CONFIG_MAX_RETRIES="2", GCS_RETRY_CONFIG_INIT_DELAY_TIME_US="1000")
  try:
    return subprocess.run(command, env=environment, check=False).returncode
  finally:
    emulator.stop()


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
