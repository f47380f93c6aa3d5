"""Sends JSON requests over MQTT as an automation identity and prints the
answers: the outside client of tests/tests/automation_mqtt.rs.

usage: mqtt_requests.py HOST PORT NAME PASSWORD ROOT TIMEOUT_S < requests

stdin holds one request per line, sent as is (so malformed ones too). The
script subscribes to its own response topic first, publishes every
request, and prints one JSON line per answer received until as many
answers as requests arrived or the time is up. Exit status 0 either way:
the test judges what arrived.
"""

import json
import sys
import time

import paho.mqtt.client as mqtt

host, port, name, password, root, timeout = sys.argv[1:7]
requests = [line.rstrip("\n").encode() for line in sys.stdin if line.strip()]
answers = []
subscribed = []

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"py-{name}-{time.time_ns()}")
client.username_pw_set(f"$auto:{name}", password)


def on_connect(c, _userdata, _flags, reason, _props):
    if reason.is_failure:
        print(json.dumps({"connect_failed": str(reason)}), flush=True)
        return
    c.subscribe(f"{root}/v1/json/res/{name}", qos=1)


def on_subscribe(_c, _userdata, _mid, reasons, _props):
    subscribed.append([r.value for r in reasons])


def on_message(_c, _userdata, msg):
    answers.append(msg.payload)


client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, int(port), keepalive=10)
client.loop_start()
deadline = time.time() + float(timeout)
while not subscribed and time.time() < deadline:
    time.sleep(0.05)
if subscribed and subscribed[0][0] < 0x80:
    for r in requests:
        client.publish(f"{root}/v1/json/req/{name}", r, qos=1)
    while len(answers) < len(requests) and time.time() < deadline:
        time.sleep(0.05)
else:
    print(json.dumps({"subscribe_refused": subscribed}), flush=True)
client.loop_stop()
client.disconnect()
for a in answers:
    print(a.decode(), flush=True)
