package revoke

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"sync"
	"time"
)

// fakeKeystone answers POST /v3/auth/tokens and GET /v3/OS-REVOKE/events like
// Keystone 22 does, from events the test adds. For unit tests only: the
// package's other tests run a real Keystone.
type fakeKeystone struct {
	srv *httptest.Server

	mu        sync.Mutex
	events    []map[string]any
	valid     map[string]bool // tokens accepted
	n         int
	auths     int
	lists     int
	lifetime  time.Duration
	listCode  int // when not 0, GET events answers this status
	authCode  int // when not 0, POST auth answers this status
	lastSince string
	lastAuth  map[string]any
}

func newFakeKeystone(useTLS bool) *fakeKeystone {
	f := unstartedFakeKeystone()
	if useTLS {
		f.srv.StartTLS()
	} else {
		f.srv.Start()
	}
	return f
}

// newFakeKeystoneTLS serves HTTPS with cfg (its GetConfigForClient can
// change the certificate while it runs).
func newFakeKeystoneTLS(cfg *tls.Config) *fakeKeystone {
	f := unstartedFakeKeystone()
	f.srv.TLS = cfg
	f.srv.StartTLS()
	return f
}

func unstartedFakeKeystone() *fakeKeystone {
	f := &fakeKeystone{valid: map[string]bool{}, lifetime: time.Hour}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v3/auth/tokens", f.auth)
	mux.HandleFunc("GET /v3/OS-REVOKE/events", f.list)
	f.srv = httptest.NewUnstartedServer(mux)
	f.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // TLS handshakes refused on purpose
	return f
}

func (f *fakeKeystone) URL() string { return f.srv.URL + "/v3" }
func (f *fakeKeystone) Close()      { f.srv.Close() }

func (f *fakeKeystone) auth(w http.ResponseWriter, r *http.Request) {
	var body map[string]any
	_ = json.NewDecoder(r.Body).Decode(&body)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.auths++
	f.lastAuth = body
	if f.authCode != 0 {
		w.WriteHeader(f.authCode)
		fmt.Fprint(w, `{"error": {"code": 401, "message": "The request you have made requires authentication."}}`)
		return
	}
	f.n++
	tok := fmt.Sprintf("tok-%d", f.n)
	f.valid[tok] = true
	now := time.Now().UTC()
	w.Header().Set("X-Subject-Token", tok)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"token": {"methods": ["password"], "issued_at": %q, "expires_at": %q}}`,
		now.Format("2006-01-02T15:04:05.000000Z"), now.Add(f.lifetime).Format("2006-01-02T15:04:05.000000Z"))
}

func (f *fakeKeystone) list(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lists++
	if !f.valid[r.Header.Get("X-Auth-Token")] {
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"error": {"code": 401}}`)
		return
	}
	if f.listCode != 0 {
		w.WriteHeader(f.listCode)
		fmt.Fprint(w, `{"error": {"code": 403, "message": "You are not authorized to perform the requested action: identity:list_revoke_events."}}`)
		return
	}
	since := r.URL.Query().Get("since")
	f.lastSince = since
	var sinceT time.Time
	if since != "" {
		var err error
		if sinceT, err = parseTime(since); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
	}
	out := []map[string]any{}
	for _, e := range f.events {
		at, _ := parseTime(e["revoked_at"].(string))
		if since == "" || at.After(sinceT) {
			out = append(out, e)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"events": out, "links": map[string]any{"next": nil}})
}

// add records an event revoked at (second precision, as Keystone stores it).
func (f *fakeKeystone) add(fields map[string]any, at time.Time) {
	at = at.UTC().Truncate(time.Second)
	e := map[string]any{
		"issued_before": at.Format("2006-01-02T15:04:05.000000Z"),
		"revoked_at":    at.Format("2006-01-02T15:04:05.000000Z"),
	}
	for k, v := range fields {
		e[k] = v
	}
	f.mu.Lock()
	f.events = append(f.events, e)
	f.mu.Unlock()
}

// revokeTokens makes every issued token invalid (as a key rotation would).
func (f *fakeKeystone) revokeTokens() {
	f.mu.Lock()
	f.valid = map[string]bool{}
	f.mu.Unlock()
}

func (f *fakeKeystone) counts() (auths, lists int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.auths, f.lists
}
