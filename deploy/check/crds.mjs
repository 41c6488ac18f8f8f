// Validates the custom resources of a rendered overlay (a JSON array on stdin) against the schemas that
// @kubernetes-models generates from the KEDA and Prometheus Operator CRDs: types, required fields, enums.
// Prints one line per problem and exits 1 if there is any; core objects are checked by validate.py.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const docs = JSON.parse(Buffer.concat(chunks).toString("utf8"));
let problems = 0;
let checked = 0;
for (const doc of docs) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const Model = models[key];
  if (!Model) {
    console.log(`${key} ${doc.metadata?.name}: no schema for this custom resource`);
    problems++;
    continue;
  }
  try {
    new Model(doc).validate();
    checked++;
  } catch (e) {
    console.log(`${key} ${doc.metadata?.name}: ${e.message}`);
    problems++;
  }
}
console.log(`custom resources: ${checked} valid, ${problems} with problems`);
process.exit(problems ? 1 : 0);
