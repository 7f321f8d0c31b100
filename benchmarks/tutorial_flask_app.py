"""The tutorial's deployment, written from its description: a Flask app with one ResNet-18 forward pass per
request, in a single process, no validation. Used only as the baseline in serve_load.py.

    python benchmarks/tutorial_flask_app.py PORT
"""

import io
import sys

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torchvision import models, transforms

app = Flask(__name__)
model = models.resnet18(weights=None)  # the tutorial loads ImageNet weights; the cost per request is the same
model.fc = torch.nn.Linear(512, 2)
model.eval()
transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
classes = ["cat", "dog"]


@app.route("/predict", methods=["POST"])
def predict():
    image = Image.open(io.BytesIO(request.files["file"].read())).convert("RGB")
    with torch.no_grad():
        probabilities = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
    index = int(probabilities.argmax())
    return jsonify({"label": classes[index], "confidence": float(probabilities[index])})


@app.route("/health")
def health():
    return "ok"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]))  # Flask's defaults: one process, a thread per request
