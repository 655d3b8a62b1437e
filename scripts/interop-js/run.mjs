// Interoperability check: the npm `fhirclient` library (SMART's reference JavaScript client,
// Node adapter) performs a standalone patient launch against fhirserver and reads the patient.
// A tiny app server hosts /launch and /callback; this script also plays the user's browser
// (sign in, approve). Usage: node run.mjs ISS USERNAME PASSWORD CLIENT_ID APP_PORT EXPECTED_PATIENT
import http from "node:http";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const smart = require("fhirclient");

const [iss, username, password, clientId, appPort, expected] = process.argv.slice(2);
const appOrigin = `http://127.0.0.1:${appPort}`;
const session = {};

const app = http.createServer(async (req, res) => {
  req.session = session; // the Node adapter keeps its state in req.session
  const url = new URL(req.url, appOrigin);
  try {
    if (url.pathname === "/launch") {
      await smart(req, res).authorize({
        iss, clientId, redirectUri: "/callback", pkceMode: "required",
        scope: "openid fhirUser launch/patient patient/*.rs",
      });
      return;
    }
    if (url.pathname === "/callback") {
      const client = await smart(req, res).ready();
      const patient = await client.request(`Patient/${client.patient.id}`);
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ patient: client.patient.id, family: patient.name?.[0]?.family,
                               fhirUser: client.getFhirUser() }));
      return;
    }
    res.writeHead(404);
    res.end();
  } catch (err) {
    res.writeHead(500, { "content-type": "text/plain" });
    res.end(String((err && err.stack) || err));
  }
});

// --- the user's browser ---------------------------------------------------------------
let cookie = "";
async function browse(url, init = {}) {
  const resp = await fetch(url, { ...init, redirect: "manual",
    headers: { ...(init.headers || {}), ...(cookie && url.startsWith(iss.replace(/\/fhir$/, "")) ? { cookie } : {}) } });
  const set = resp.headers.get("set-cookie");
  if (set && url.startsWith(iss.replace(/\/fhir$/, ""))) cookie = set.split(";")[0];
  return resp;
}
const decode = (s) => s.replace(/&amp;/g, "&").replace(/&#34;|&quot;/g, '"').replace(/&#39;/g, "'")
  .replace(/&lt;/g, "<").replace(/&gt;/g, ">");
function hidden(html) {
  return [...html.matchAll(/<input type="hidden" name="([^"]+)" value="([^"]*)">/g)].map((m) => [m[1], decode(m[2])]);
}
function checkedScopes(html) {
  return [...html.matchAll(/name="scope" value="([^"]*)" checked/g)].map((m) => ["scope", decode(m[1])]);
}
async function post(url, pairs) {
  return browse(url, { method: "POST", body: new URLSearchParams(pairs).toString(),
    headers: { "content-type": "application/x-www-form-urlencoded" } });
}
function fail(msg) {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
}

app.listen(Number(appPort), "127.0.0.1", async () => {
  try {
    let resp = await browse(`${appOrigin}/launch`);
    if (resp.status !== 302) fail(`app /launch answered ${resp.status}: ${await resp.text()}`);
    const authorizeUrl = resp.headers.get("location");
    const authorizeEndpoint = authorizeUrl.split("?")[0];
    resp = await browse(authorizeUrl);
    let html = await resp.text();
    if (!html.includes('name="password"')) fail(`no login form (${resp.status}): ${html}`);
    resp = await post(authorizeEndpoint, [...hidden(html), ["username", username], ["password", password]]);
    html = await resp.text();
    if (!html.includes('name="approve"')) fail(`no approval form (${resp.status}): ${html}`);
    resp = await post(authorizeEndpoint, [...hidden(html), ...checkedScopes(html), ["approve", "1"]]);
    if (resp.status !== 302) fail(`approval answered ${resp.status}: ${await resp.text()}`);
    resp = await browse(new URL(resp.headers.get("location"), appOrigin).toString());
    const body = await resp.text();
    if (resp.status !== 200) fail(`app callback answered ${resp.status}: ${body}`);
    const result = JSON.parse(body);
    if (result.patient !== expected) fail(`patient in context ${result.patient}, expected ${expected}`);
    if (!result.fhirUser || !result.fhirUser.endsWith(`Patient/${expected}`)) fail(`fhirUser ${result.fhirUser}`);
    console.log(JSON.stringify({ ok: true, ...result }));
    process.exit(0);
  } catch (err) {
    fail(String((err && err.stack) || err));
  }
});
