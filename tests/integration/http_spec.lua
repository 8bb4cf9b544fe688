-- rbe.http against the local test server (tests/fixtures/httpd.js: HTTP
-- and HTTPS on 127.0.0.1, random ports, a self-signed certificate made
-- here with openssl): methods, query/JSON/form encoding, headers, redirects,
-- statuses, timeouts, cancellation, retries, files both ways, gzip, TLS,
-- concurrency, per-host limits and secret masking.  Concurrency and
-- retries are asserted on what the server observed (/stats), not on time.
local rbe = require "rbe"
local http = require "rbe.http"
local json = require "rbe.json"
local proc = require "rbe.proc"
local fs = require "rbe.fs"

local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local HTTPD = HERE .. "/../fixtures/httpd.js"

local srv, base, tls_base, tmp, cert

local function stats()
  return http.get(base .. "/stats"):json()
end

local function key_stats(key)
  return stats().keys[key] or { requests = 0, max_inflight = 0, times = {} }
end

local raises = require("support").raises

local function sha256(path)
  return (proc.run({ "sha256sum", path }).stdout:match("^(%x+)"))
end

-- wait until cond() holds (the server sees an abort a moment after we
-- close the connection)
local function eventually(cond, secs)
  local deadline = rbe.now() + (secs or 5)
  while rbe.now() < deadline do
    if cond() then return true end
    rbe.sleep(0.02)
  end
  return cond()
end

setup(function()
  -- no proxy from the environment between us and 127.0.0.1
  for _, v in ipairs { "http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY" } do
    rbe.setenv(v, nil)
  end
  tmp = fs.tmpdir()
  cert = tmp .. "/cert.pem"
  proc.run({ "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", tmp .. "/key.pem",
    "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
    "subjectAltName=IP:127.0.0.1" })
  srv = proc.spawn({ "node", HTTPD, cert, tmp .. "/key.pem" }, { stderr = "inherit" })
  local line = rbe.timeout("20s", srv:lines())
  local ports = json.decode(assert(line, "httpd.js printed no ports"))
  base = "http://127.0.0.1:" .. ports.http
  tls_base = "https://127.0.0.1:" .. ports.https
end)

teardown(function()
  http.close_idle()
  if srv then srv:close() end
  if tmp then fs.remove(tmp, { recursive = true }) end
end)

describe("#http rbe.json", function()
  it("encodes marked empty arrays as [] and never changes the caller's table", function()
    local t = { list = json.array(), obj = {}, n = rbe.null, c = json.null }
    assert.are.equal('[]', json.encode(json.array()))
    assert.are.equal('[1,2]', json.encode(json.array { 1, 2 }))
    local back = json.decode(json.encode(t))
    assert.is_true(json.is_array(back.list))
    assert.are.equal(json.null, back.n)
    assert.are.equal(json.null, back.c)
    assert.are.equal("{}", json.encode(back.obj))
    assert.is_true(json.is_array(t.list))       -- the caller's table as it was
    assert.are.equal(rbe.null, t.n)
    assert.is_false(json.is_array({}))
    assert.truthy(raises(json.array, 5):find("table expected", 1, true))
  end)

  it("keeps integers exact both ways", function()
    assert.are.equal('[9007199254740993,-123456789012345678,1,0.5]',
      json.encode(json.array { 9007199254740993, -123456789012345678, 1, 0.5 }))
    local v = json.decode('{"id": 7, "big": 123456789012, "f": 1.5, "e": 1e3}')
    assert.are.equal("integer", math.type(v.id))
    assert.are.equal("/items/7", "/items/" .. v.id)
    assert.are.equal(123456789012, v.big)
    assert.are.equal(1.5, v.f)
    assert.are.equal(1000, v.e)
  end)

  it("does not mistake [] inside strings for arrays", function()
    local v = json.decode('{"s": "[]", "t": "a \\" [ ] b", "a": [ ], "n": [[], {"x": []}]}')
    assert.are.equal("[]", v.s)
    assert.are.equal('a " [ ] b', v.t)
    assert.is_true(json.is_array(v.a))
    assert.is_true(json.is_array(v.n[1]))
    assert.is_true(json.is_array(v.n[2].x))
  end)

  it("reveals secrets and raises json errors", function()
    assert.are.equal('{"k":"v"}', json.encode { k = rbe.secret("v") })
    local err = raises(json.decode, "{bad")
    assert.are.equal("json", err.kind)
    assert.are.equal("EBADMSG", err.code)
    err = raises(json.encode, { f = print })
    assert.are.equal("EINVAL", err.code)
    local loop = {}
    loop.self = loop
    err = raises(json.encode, loop)
    assert.are.equal("EINVAL", err.code)
    assert.truthy(err.message:find("deeper", 1, true))
  end)
end)

describe("#http rbe.http", function()
  before_each(function()
    http.post(base .. "/reset")
  end)

  after_each(function()
    -- cached connections are descriptors: give them back before the
    -- helper counts descriptors
    assert.is_true(http.close_idle())
    local s = http._stats()
    assert.are.equal(0, s.active)
    assert.are.equal(0, s.queued)
    assert.are.equal(0, s.gates)
    assert.are.equal(s.pooled, s.easy)  -- every easy handle back in the pool
  end)

  describe("requests", function()
    it("sends every method, with and without a body", function()
      for _, m in ipairs { "get", "delete", "options" } do
        local r = http[m](base .. "/echo")
        assert.are.equal(200, r.status)
        assert.are.equal(m:upper(), r:json().method)
        assert.are.equal(m:upper(), r.method)
      end
      for _, m in ipairs { "post", "put", "patch" } do
        local e = http[m](base .. "/echo", { body = "data-" .. m }):json()
        assert.are.equal(m:upper(), e.method)
        assert.are.equal("data-" .. m, e.body)
        assert.are.equal("application/octet-stream", e.content_type)
        assert.is_nil(e.headers.expect)      -- no 100-continue round trip
      end
      local e = http.request { method = "delete", url = base .. "/echo", body = "x" }:json()
      assert.are.equal("DELETE", e.method)
      assert.are.equal("x", e.body)
      e = http.request { method = "PURGE", url = base .. "/echo" }:json()
      assert.are.equal("PURGE", e.method)
      for _, m in ipairs { "post", "put", "patch" } do   -- no body: an empty one
        e = http[m](base .. "/echo"):json()
        assert.are.equal(m:upper(), e.method)
        assert.are.equal("0", e.headers["content-length"])
        assert.is_nil(e.headers["content-type"])
      end
      local h = http.head(base .. "/echo")
      assert.are.equal(200, h.status)
      assert.are.equal("", h.body)
      assert.are.equal("application/json", h.headers["content-type"])
      assert.are.equal(base .. "/echo", h.url)
    end)

    it("encodes query parameters and merges them with the URL's", function()
      local e = http.get(base .. "/echo?pre=1", { query = {
        q = "a b&c=d/é", list = { "x", "y" }, n = 42, flag = true,
      } }):json()
      assert.are.same({ "1" }, e.query.pre)
      assert.are.same({ "a b&c=d/é" }, e.query.q)
      assert.are.same({ "x", "y" }, e.query.list)
      assert.are.same({ "42" }, e.query.n)
      assert.are.same({ "true" }, e.query.flag)
      -- keys are sorted, values percent-encoded
      assert.are.equal("/echo?pre=1&flag=true&list=x&list=y&n=42&q=a%20b%26c%3Dd%2F%C3%A9", e.url)
      e = http.get(base .. "/echo", { query = "raw=1&x=%20" }):json()
      assert.are.same({ " " }, e.query.x)
    end)

    it("sends JSON and decodes JSON responses", function()
      local sent = { name = "rollback", n = 7, big = 9007199254740993, tags = json.array(),
        nested = { list = json.array { 1, 2 }, none = rbe.null }, ok = false }
      local e = http.post(base .. "/echo", { json = sent }):json()
      assert.are.equal("application/json", e.content_type)
      -- the server saw [] for the marked empty table and exact integers
      assert.truthy(e.body:find('"tags":[]', 1, true))
      assert.truthy(e.body:find('"big":9007199254740993', 1, true))
      assert.truthy(e.body:find('"none":null', 1, true))
      local back = json.decode(e.body)
      assert.are.equal(7, back.n)
      assert.are.equal("integer", math.type(back.n))
      assert.is_true(json.is_array(back.tags))
      -- a document's [] survives a decode/encode round trip
      local doc = http.get(base .. "/json"):json()
      assert.is_true(doc.ok)
      assert.is_true(json.is_array(doc.empty))
      assert.is_true(json.is_array(doc.nested.list[3]))
      assert.are.equal(json.null, doc.nothing)
      assert.are.equal("héllo ✓", doc.text)
      assert.are.equal("integer", math.type(doc.nested.list[1]))
      local again = json.decode(json.encode(doc))
      assert.is_true(json.is_array(again.empty))
      assert.are.equal("{}", json.encode(doc.obj))
    end)

    it("sends forms, bearer and basic auth", function()
      local e = http.post(base .. "/echo", { form = { a = "1 2", b = "x&y" } }):json()
      assert.are.equal("application/x-www-form-urlencoded", e.content_type)
      assert.are.equal("a=1%202&b=x%26y", e.body)
      e = http.get(base .. "/echo", { auth = { bearer = rbe.secret("tok123") } }):json()
      assert.are.equal("Bearer tok123", e.headers.authorization)
      e = http.get(base .. "/echo", { auth = { basic = { "user", "pass" } } }):json()
      assert.are.equal("Basic dXNlcjpwYXNz", e.headers.authorization)
    end)

    it("sends headers and reads response headers case-insensitively", function()
      local e = http.get(base .. "/echo", { headers = {
        ["X-Custom"] = "v1", ["X-Many"] = { "a", "b" }, ["User-Agent"] = "rollback/1",
        Accept = false, ["X-Secret"] = rbe.secret("s3"),
      } }):json()
      assert.are.equal("v1", e.headers["x-custom"])
      assert.are.equal("a, b", e.headers["x-many"])
      assert.are.equal("rollback/1", e.headers["user-agent"])
      assert.is_nil(e.headers.accept)
      assert.are.equal("s3", e.headers["x-secret"])
      local r = http.get(base .. "/headers")
      assert.are.equal("only", r.headers["X-Single"])
      assert.are.equal("only", r.headers["x-single"])
      assert.are.equal("one, two", r.headers["X-MULTI"])
      assert.are.same({ "one", "two" }, r:header_all("x-multi"))
      assert.are.same({ "a=1; Path=/", "b=2; Path=/" }, r:header_all("Set-Cookie"))
      assert.is_nil(r.headers["x-nope"])
      assert.are.equal("OK", r.reason)
      assert.are.equal("1.1", r.http_version)
      for _, k in ipairs { "dns", "connect", "tls", "first_byte", "total" } do
        assert.is_true(r.timings[k] >= 0)
      end
      assert.is_true(r.timings.total >= r.timings.first_byte)
    end)

    it("rejects misuse with plain errors before sending", function()
      local err = raises(http.get, base .. "/echo", { timout = "1s" })
      assert.is_string(err)
      assert.truthy(err:find("unknown option 'timout'", 1, true))
      err = raises(http.post, base .. "/echo", { body = "a", json = {} })
      assert.truthy(err:find("only one of", 1, true))
      err = raises(http.get, "ftp://127.0.0.1/x")
      assert.truthy(err:find("only http:// and https://", 1, true))
      err = raises(http.get, base .. "/echo", { timeout = "soon" })
      assert.truthy(err:find("duration", 1, true))
      err = raises(http.request, { method = "GE T", url = base })
      assert.truthy(err:find("bad method", 1, true))
      err = raises(http.client, { verify = false })
      assert.truthy(err:find("per request", 1, true))
      assert.are.equal(0, stats().requests)
    end)

    it("reuses one connection for sequential requests", function()
      http.close_idle()             -- drop the connection reset used
      local conns = {}
      for i = 1, 10 do conns[i] = http.get(base .. "/echo"):json().conn end
      for i = 2, 10 do assert.are.equal(conns[1], conns[i]) end
      local s = stats()
      assert.are.equal(10, s.requests)
      assert.are.equal(1, s.connections)
    end)
  end)

  describe("redirects", function()
    it("follows redirects and reports the final URL", function()
      local r = http.get(base .. "/redirect/3")
      assert.are.equal(200, r.status)
      assert.are.equal(base .. "/redirect/0", r.url)
      assert.are.equal(3, r.redirects)
      assert.is_true(r:json().redirected)
    end)

    it("returns the redirect itself with follow_redirects = false", function()
      local r = http.get(base .. "/redirect/3", { follow_redirects = false })
      assert.are.equal(302, r.status)
      assert.are.equal("/redirect/2", r.headers.location)
    end)

    it("raises on a redirect loop and past max_redirects", function()
      local err = raises(http.get, base .. "/loop")
      assert.are.equal("http", err.kind)
      assert.are.equal("CURLE_TOO_MANY_REDIRECTS", err.code)
      assert.is_false(err.retryable)
      assert.truthy(err.message:find("GET " .. base .. "/loop", 1, true))
      assert.are.equal(11, key_stats("default").requests)   -- 1 + 10 redirects
      http.post(base .. "/reset")
      err = raises(http.get, base .. "/redirect/3", { max_redirects = 2 })
      assert.are.equal("CURLE_TOO_MANY_REDIRECTS", err.code)
      assert.are.equal(3, key_stats("default").requests)
    end)

    it("never follows a redirect to another protocol", function()
      local err = raises(http.get, base .. "/redirect-to", { query = { url = "file:///etc/passwd" } })
      assert.are.equal("CURLE_UNSUPPORTED_PROTOCOL", err.code)
      err = raises(http.get, base .. "/redirect-to", { query = { url = "ftp://127.0.0.1:1/x" } })
      assert.are.equal("CURLE_UNSUPPORTED_PROTOCOL", err.code)
    end)
  end)

  describe("statuses", function()
    it("raises an http error for 4xx and 5xx", function()
      local err = raises(http.get, base .. "/status/404")
      assert.is_true(rbe.is_error(err))
      assert.are.equal("http", err.kind)
      assert.are.equal(404, err.code)
      assert.are.equal(404, err.status)
      assert.are.equal("GET", err.method)
      assert.are.equal(base .. "/status/404", err.url)
      assert.are.equal("status 404 for /status/404", err.body)
      assert.is_false(err.retryable)
      assert.are.equal(1, err.attempts)
      assert.truthy(tostring(err):find("^http: GET " .. base:gsub("%p", "%%%0")
        .. "/status/404 %-> 404 Not Found: status 404 for /status/404 %(404%)$"))
      err = raises(http.post, base .. "/status/500", { json = {} })
      assert.are.equal(500, err.code)
      assert.are.equal("POST", err.method)
      assert.is_false(err.retryable)
      for _, s in ipairs { 429, 502, 503, 504 } do
        err = raises(http.get, base .. "/status/" .. s)
        assert.is_true(err.retryable, "status " .. s)
      end
    end)

    it("returns listed statuses with expect, and everything with raise = false", function()
      local r = http.get(base .. "/status/404", { expect = { 200, 404 } })
      assert.are.equal(404, r.status)
      assert.is_false(r.ok)
      -- expect is exact: a 200 not listed raises
      local err = raises(http.get, base .. "/echo", { expect = 201 })
      assert.are.equal(200, err.code)
      r = http.get(base .. "/status/503", { raise = false })
      assert.are.equal(503, r.status)
      assert.are.equal("status 503 for /status/503", r.body)
      r = http.get(base .. "/empty")
      assert.are.equal(204, r.status)
      assert.are.equal("", r.body)
      assert.is_true(r.ok)
    end)

    it("res:json() raises a clear json error for a body that is not JSON", function()
      local r = http.get(base .. "/notjson")
      local err = raises(r.json, r)
      assert.are.equal("json", err.kind)
      assert.are.equal("EBADMSG", err.code)
      assert.truthy(err.message:find("not valid JSON", 1, true))
      assert.truthy(err.message:find("text/html", 1, true))
      assert.truthy(err.message:find("<html><body>oops", 1, true))
      r = http.get(base .. "/empty")
      err = raises(r.json, r)
      assert.truthy(err.message:find("empty", 1, true))
    end)

    it("limits an in-memory body with max_body", function()
      local err = raises(http.get, base .. "/big", { query = { size = 100000 }, max_body = 1000 })
      assert.are.equal("http", err.kind)
      assert.are.equal("EMSGSIZE", err.code)
      assert.truthy(err.message:find("output = path", 1, true))
    end)
  end)

  describe("failures", function()
    it("times out against a server that stalls, and the server sees it", function()
      local err = raises(http.get, base .. "/stall", { timeout = "200ms" })
      assert.are.equal("timeout", err.kind)
      assert.are.equal("CURLE_OPERATION_TIMEDOUT", err.code)
      assert.is_true(err.retryable)
      assert.truthy(err.message:find("GET " .. base .. "/stall", 1, true))
      assert.is_true(eventually(function() return stats().aborted == 1 end))
    end)

    it("raises CURLE_COULDNT_CONNECT when the connection is refused", function()
      local err = raises(http.get, "http://127.0.0.1:1/nothing-here")
      assert.are.equal("http", err.kind)
      assert.are.equal("CURLE_COULDNT_CONNECT", err.code)
      assert.is_true(err.retryable)
      assert.truthy(err.message:find("127.0.0.1:1/nothing-here", 1, true))
    end)

    it("rbe.timeout removes the request and closes its connection", function()
      local ok, err = pcall(rbe.timeout, "150ms", http.get, base .. "/stall")
      assert.is_false(ok)
      assert.are.equal("timeout", err.kind)
      assert.are.equal(0, http._stats().active)
      assert.is_true(eventually(function() return stats().aborted == 1 end))
      -- the loop and the multi handle are fine afterwards
      assert.are.equal(200, http.get(base .. "/echo").status)
    end)

    it("cancelling the task cancels its request", function()
      local t = rbe.spawn(http.get, base .. "/stall")
      assert.is_true(eventually(function() return http._stats().active == 1 end))
      t:cancel()
      local ok, err = pcall(t.join, t)
      assert.is_false(ok)
      assert.are.equal("cancelled", err.kind)
      assert.are.equal(0, http._stats().active)
      assert.is_true(eventually(function() return stats().aborted == 1 end))
    end)
  end)

  describe("retries", function()
    it("retries a 503 until it gets a 200", function()
      local r = http.get(base .. "/flaky", { query = { key = "r1", fail = 2 },
        retries = 3, backoff = "10ms" })
      assert.are.equal(200, r.status)
      assert.are.equal(3, r.attempts)
      assert.are.equal(3, r:json().attempts)
      assert.are.equal(3, key_stats("r1").requests)
    end)

    it("raises the last error once the retries are used up", function()
      local err = raises(http.get, base .. "/flaky", { query = { key = "r2", fail = 10 },
        retries = 2, backoff = "1ms" })
      assert.are.equal(503, err.code)
      assert.are.equal(3, err.attempts)
      assert.are.equal(3, key_stats("r2").requests)
      -- a 404 is not retried
      err = raises(http.get, base .. "/flaky", { query = { key = "r3", status = 404 },
        retries = 2, backoff = "1ms" })
      assert.are.equal(404, err.code)
      assert.are.equal(1, key_stats("r3").requests)
    end)

    it("retries POST only with retry_unsafe", function()
      local err = raises(http.post, base .. "/flaky", { query = { key = "p1" },
        json = {}, retries = 2, backoff = "1ms" })
      assert.are.equal(503, err.code)
      assert.are.equal(1, key_stats("p1").requests)
      local r = http.post(base .. "/flaky", { query = { key = "p2" }, json = {},
        retries = 2, backoff = "1ms", retry_unsafe = true })
      assert.are.equal(200, r.status)
      assert.are.equal(2, key_stats("p2").requests)
    end)

    it("retries connection failures", function()
      local t0 = rbe.now()
      local err = raises(http.get, "http://127.0.0.1:1/", { retries = 2, backoff = "1ms" })
      assert.are.equal("CURLE_COULDNT_CONNECT", err.code)
      assert.are.equal(3, err.attempts)
      assert.is_true(rbe.now() - t0 < 10)
    end)

    it("waits as long as Retry-After says", function()
      local r = http.get(base .. "/flaky", { query = { key = "ra", retry_after = 1 },
        retries = 1, backoff = "1ms" })
      assert.are.equal(200, r.status)
      local times = key_stats("ra").times
      assert.are.equal(2, #times)
      -- the server saw the second attempt a second after the first (a
      -- lower bound the client must honour, not a speed measurement)
      assert.is_true(times[2] - times[1] >= 950, "gap " .. (times[2] - times[1]))
      -- a Retry-After longer than max_backoff is not waited for
      local err = raises(http.get, base .. "/flaky", { query = { key = "rb", retry_after = 120 },
        retries = 3, backoff = "1ms" })
      assert.are.equal(503, err.code)
      assert.are.equal(120, err.retry_after)
      assert.are.equal(1, key_stats("rb").requests)
      -- the HTTP-date form
      assert.are.equal(0, http._retry_after("Wed, 21 Oct 2015 07:28:00 GMT"))
      local soon = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 100)
      local secs = http._retry_after(soon)
      assert.is_true(secs > 90 and secs <= 101, tostring(secs))
    end)
  end)

  describe("files", function()
    it("downloads 50 MB to a file, renamed into place when complete", function()
      local dir = tmp .. "/dl"
      fs.mkdir(dir)
      local path = dir .. "/big.bin"
      local size = 50 * 1024 * 1024
      local r = http.get(base .. "/big", { query = { size = size }, output = path,
        timeout = "2m" })
      assert.are.equal(200, r.status)
      assert.are.equal(path, r.output)
      assert.are.equal(size, r.size)
      assert.is_nil(r.body)
      assert.are.equal(size, fs.stat(path).size)
      assert.are.equal(r.headers["x-sha256"], sha256(path))
      assert.are.same({ "big.bin" }, fs.list(dir))
      local err = raises(r.json, r)
      assert.truthy(err.message:find("written to", 1, true))
      -- a failed download leaves the old file alone and no partial file
      err = raises(http.get, base .. "/status/404", { output = path })
      assert.are.equal(404, err.code)
      assert.are.equal("status 404 for /status/404", err.body)
      assert.are.equal(size, fs.stat(path).size)
      -- max_body limits bodies kept in memory, not files
      r = http.get(base .. "/big", { query = { size = 100000 }, output = dir .. "/small.bin",
        max_body = 10 })
      assert.are.equal(100000, fs.stat(dir .. "/small.bin").size)
    end)

    it("deletes the partial file when a download is cancelled", function()
      local dir = tmp .. "/dl2"
      fs.mkdir(dir)
      local ok, err = pcall(rbe.timeout, "200ms", http.get, base .. "/stall",
        { output = dir .. "/x.bin" })
      assert.is_false(ok)
      assert.are.equal("timeout", err.kind)
      assert.are.same({}, fs.list(dir))
      err = raises(http.get, base .. "/stall", { output = dir .. "/y.bin", timeout = "100ms" })
      assert.are.equal("CURLE_OPERATION_TIMEDOUT", err.code)
      assert.are.same({}, fs.list(dir))
    end)

    it("uploads a file with body_file", function()
      local path = tmp .. "/up.bin"
      proc.sh("head -c 5242887 /dev/urandom > " .. proc.quote(path))
      for _, m in ipairs { "post", "put" } do
        local e = http[m](base .. "/echo", { body_file = path,
          headers = { ["Content-Type"] = "application/x-tar" } }):json()
        assert.are.equal(m:upper(), e.method)
        assert.are.equal(5242887, e.length)
        assert.are.equal(sha256(path), e.sha256)
        assert.are.equal("application/x-tar", e.content_type)
      end
      local err = raises(http.post, base .. "/echo", { body_file = tmp .. "/missing" })
      assert.are.equal("fs", err.kind)
      assert.are.equal("ENOENT", err.code)
    end)
  end)

  describe("encodings and TLS", function()
    it("asks for gzip and decodes it", function()
      local r = http.get(base .. "/gzip")
      assert.are.equal("gzip", r.headers["content-encoding"])
      assert.are.equal(tonumber(r.headers["x-plain-length"]), #r.body)
      assert.is_true(tonumber(r.headers["content-length"]) < #r.body)
      assert.are.equal(200, #r:json().items)
      r = http.get(base .. "/gzip", { compressed = false })
      assert.is_nil(r.headers["content-encoding"])
      assert.are.equal(200, #r:json().items)
    end)

    it("verifies TLS: a self-signed server fails by default, passes with its ca_file", function()
      local err = raises(http.get, tls_base .. "/echo")
      assert.are.equal("http", err.kind)
      assert.are.equal("CURLE_PEER_FAILED_VERIFICATION", err.code)
      assert.truthy(err.message:find("certificate", 1, true))
      local r = http.get(tls_base .. "/echo", { ca_file = cert })
      assert.are.equal(200, r.status)
      assert.is_true(r.timings.tls > 0)
      r = http.get(tls_base .. "/echo", { verify = false })
      assert.are.equal(200, r.status)
      local c = http.client { base_url = tls_base, ca_file = cert }
      assert.are.equal("GET", c:get("/echo"):json().method)
    end)
  end)

  describe("concurrency", function()
    it("runs 200 requests at once", function()
      local tasks = {}
      for i = 1, 200 do
        tasks[i] = rbe.spawn(function()
          return http.get(base .. "/barrier", { query = { n = 200, key = "c200" } }):json()
        end)
      end
      for i = 1, 200 do assert.is_true(tasks[i]:join().released) end
      local ks = key_stats("c200")
      assert.are.equal(200, ks.requests)
      assert.are.equal(200, ks.max_inflight)
    end)

    it("a client keeps at most max_per_host requests in flight per host", function()
      local c = http.client { base_url = base .. "/", max_per_host = 4,
        headers = { ["X-Client"] = "c1" }, timeout = "10s" }
      local fns = {}
      for i = 1, 20 do
        fns[i] = function()
          return c:get("slow", { query = { ms = 30, key = "mph" } }).status
        end
      end
      local results = rbe.parallel(fns)
      for i = 1, 20 do assert.are.equal(200, results[i]) end
      local ks = key_stats("mph")
      assert.are.equal(20, ks.requests)
      assert.are.equal(4, ks.max_inflight)
      -- client headers, and a request's own replacing them
      local e = c:get("/echo"):json()
      assert.are.equal("c1", e.headers["x-client"])
      e = c:get("echo", { headers = { ["x-client"] = "mine" } }):json()
      assert.are.equal("mine", e.headers["x-client"])
      -- absolute URLs ignore base_url
      assert.are.equal("/echo", c:get(base .. "/echo"):json().path)
      c:close()
      assert.truthy(raises(c.get, c, "/echo"):find("closed", 1, true))
    end)

    it("cancelling queued and running requests of a client frees them", function()
      local c <close> = http.client { base_url = base, max_per_host = 1 }
      local t1 = rbe.spawn(c.get, c, "/stall")
      local t2 = rbe.spawn(c.get, c, "/echo")
      assert.is_true(eventually(function()
        local s = http._stats()
        return s.active == 1 and s.queued == 1
      end))
      t2:cancel()
      t1:cancel()
      assert.is_false(pcall(t1.join, t1))
      assert.is_false(pcall(t2.join, t2))
      local s = http._stats()
      assert.are.equal(0, s.active)
      assert.are.equal(0, s.queued)
    end)
  end)

  describe("secrets", function()
    it("masks secrets in error text", function()
      local url = "http://admin:hunter2@127.0.0.1:" .. base:match("%d+$")
        .. "/status/500?token=tok-abc&x=1&api_key=k-42&signature=sig99"
      local err = raises(http.get, url, { headers = {
        Authorization = "Bearer bearer-xyz", ["X-Api-Key"] = "apikey-777",
        Cookie = "session=cookie-555",
      } })
      local text = tostring(err)
      for _, s in ipairs { "hunter2", "tok-abc", "k-42", "sig99", "bearer-xyz",
                           "apikey-777", "cookie-555" } do
        assert.is_nil(text:find(s, 1, true), s .. " leaked: " .. text)
        assert.is_nil(err.url:find(s, 1, true))
        assert.is_nil((err.body or ""):find(s, 1, true))
      end
      assert.truthy(text:find("admin:***@", 1, true))
      assert.truthy(text:find("token=***&x=1&api_key=***&signature=***", 1, true))
      -- the same for a transport error, and a URL that is a secret
      err = raises(http.get, rbe.secret("http://u:pw-999@127.0.0.1:1/x?key=kk-1"))
      assert.is_nil(tostring(err):find("pw-999", 1, true))
      assert.is_nil(tostring(err):find("kk-1", 1, true))
      -- the server echoes a secret header back: scrubbed from the excerpt
      err = raises(http.get, base .. "/echo", { expect = 201,
        headers = { ["X-Token"] = rbe.secret("echoed-secret-1") } })
      assert.is_nil(tostring(err):find("echoed-secret-1", 1, true))
      assert.is_nil(err.body:find("echoed-secret-1", 1, true))
    end)

    it("masks URLs, headers and printed responses", function()
      assert.are.equal("https://u:***@h/p?a=1&access_token=***#f",
        http.mask_url("https://u:pw@h/p?a=1&access_token=zz#f"))
      assert.are.equal("https://***@h/", http.mask_url("https://tokenonly@h/"))
      assert.are.equal("***", http.mask_url(rbe.secret("https://h/")))
      assert.are.same({ Authorization = "***", ["X-Api-Key"] = "***", Accept = "*/*",
        ["X-Other"] = "***" }, http.mask_headers { Authorization = "Bearer x",
        ["X-Api-Key"] = "k", Accept = "*/*", ["X-Other"] = rbe.secret("s") })
      local r = http.get(base .. "/echo?token=visible-123")
      assert.is_nil(tostring(r):find("visible-123", 1, true))
      assert.truthy(tostring(r):find("^http response 200 OK %(GET "))
    end)
  end)
end)

describe("#http secret URLs", function()
  it("a URL given as rbe.secret (its secret in the path) never shows in errors", function()
    local srv = proc.spawn({ "node", (os.getenv("RBE_SOURCE_DIR") or rbe.whoami().cwd) .. "/tests/fixtures/httpd.js" })
    local port = tonumber(srv:lines()():match('"http":%s*(%d+)'))
    local hook = rbe.secret(("http://127.0.0.1:%d/status/503/T0KEN-in-path"):format(port))
    local ok, err = pcall(http.post, hook, { json = { text = "hi" }, retries = 1,
                                             retry_unsafe = true, backoff = "10ms" })
    srv:close()
    assert.is_false(ok)
    assert.are.equal(503, err.status)
    assert.is_nil(tostring(err):find("T0KEN", 1, true), tostring(err))
    assert.is_nil(tostring(err.url):find("T0KEN", 1, true), tostring(err.url))
    http.close_idle()
  end)
end)
