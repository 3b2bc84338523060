"""ClientApp: train the received model on this node's partition, reply with the new arrays."""

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from toyfed.task import load_partition, train

app = ClientApp()


@app.train()
def local_train(msg: Message, context: Context) -> Message:
    config = context.run_config
    arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    x, y = load_partition(int(context.node_config["partition-id"]), int(config["seed"]))
    new = train(arrays, x, y, steps=int(config["local-steps"]), lr=float(config["learning-rate"]))
    content = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(value) for key, value in new.items()}),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)
