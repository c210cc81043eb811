package keystonetest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// StatusError is a Keystone answer with an unexpected HTTP status.
type StatusError struct {
	Method, Path string
	Status       int
	Body         string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("keystonetest: %s %s: HTTP %d: %s", e.Method, e.Path, e.Status, e.Body)
}

// Request sends one request to Keystone: path is relative to URL (for example
// "/users"), token is sent as X-Auth-Token when not empty, extra headers are
// added, in (when not nil) is sent as JSON and out (when not nil) receives the
// JSON answer. Any status outside 2xx is a *StatusError. Every request carries
// "Connection: close".
func (k *Keystone) Request(ctx context.Context, method, path, token string, extra http.Header, in, out any) (http.Header, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("keystonetest: encoding %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, k.URL+path, body)
	if err != nil {
		return nil, fmt.Errorf("keystonetest: %w", err)
	}
	req.Close = true
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("X-Auth-Token", token)
	}
	for name, vs := range extra {
		for _, v := range vs {
			req.Header.Add(name, v)
		}
	}
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("keystonetest: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("keystonetest: %s %s: reading answer: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.Header, &StatusError{Method: method, Path: path, Status: resp.StatusCode, Body: strings.TrimSpace(string(data))}
	}
	if out != nil {
		if raw, ok := out.(*[]byte); ok {
			*raw = data
		} else if err := json.Unmarshal(data, out); err != nil {
			return resp.Header, fmt.Errorf("keystonetest: %s %s: decoding answer: %w", method, path, err)
		}
	}
	return resp.Header, nil
}

// admin sends a request with the admin token, getting a new one once when
// Keystone answers 401 (for example after a restart with rotated keys) or 403
// (seen under heavy load: the admin's roles briefly not found for a token
// Keystone had just issued; a new token has them).
func (k *Keystone) admin(ctx context.Context, method, path string, extra http.Header, in, out any) (http.Header, error) {
	tok, err := k.AdminToken(ctx)
	if err != nil {
		return nil, err
	}
	h, err := k.Request(ctx, method, path, tok, extra, in, out)
	if se, ok := err.(*StatusError); ok && (se.Status == http.StatusUnauthorized || se.Status == http.StatusForbidden) {
		k.mu.Lock()
		k.token = ""
		k.mu.Unlock()
		if tok, err = k.AdminToken(ctx); err != nil {
			return nil, err
		}
		return k.Request(ctx, method, path, tok, extra, in, out)
	}
	return h, err
}

// AdminToken returns a token of the admin user scoped to the admin project,
// issuing one on first use.
func (k *Keystone) AdminToken(ctx context.Context) (string, error) {
	k.mu.Lock()
	tok := k.token
	k.mu.Unlock()
	if tok != "" {
		return tok, nil
	}
	tok, _, err := k.passwordToken(ctx, map[string]any{
		"name": k.AdminUser, "domain": map[string]string{"name": k.Domain}, "password": k.AdminPassword,
	}, map[string]any{"project": map[string]any{"name": k.AdminProject, "domain": map[string]string{"name": k.Domain}}})
	if err != nil {
		return "", err
	}
	k.mu.Lock()
	k.token = tok
	k.mu.Unlock()
	return tok, nil
}

func (k *Keystone) passwordToken(ctx context.Context, user map[string]any, scope map[string]any) (string, []byte, error) {
	auth := map[string]any{
		"identity": map[string]any{
			"methods":  []string{"password"},
			"password": map[string]any{"user": user},
		},
	}
	if scope != nil {
		auth["scope"] = scope
	}
	return k.Authenticate(ctx, auth)
}

type idOnly struct {
	ID string `json:"id"`
}

// CreateProject creates an enabled project in the Default domain and returns
// its id.
func (k *Keystone) CreateProject(ctx context.Context, name string) (string, error) {
	var out struct{ Project idOnly }
	_, err := k.admin(ctx, http.MethodPost, "/projects", nil,
		map[string]any{"project": map[string]any{"name": name, "domain_id": "default", "enabled": true}}, &out)
	return out.Project.ID, err
}

// CreateUser creates an enabled user in the Default domain with the given
// password (and default project, when not empty) and returns its id.
func (k *Keystone) CreateUser(ctx context.Context, name, password, defaultProjectID string) (string, error) {
	u := map[string]any{"name": name, "domain_id": "default", "enabled": true, "password": password}
	if defaultProjectID != "" {
		u["default_project_id"] = defaultProjectID
	}
	var out struct{ User idOnly }
	_, err := k.admin(ctx, http.MethodPost, "/users", nil, map[string]any{"user": u}, &out)
	return out.User.ID, err
}

// DisableUser sets the user's enabled flag to false. Keystone records a
// revocation event for the user.
func (k *Keystone) DisableUser(ctx context.Context, userID string) error {
	_, err := k.admin(ctx, http.MethodPatch, "/users/"+url.PathEscape(userID), nil,
		map[string]any{"user": map[string]any{"enabled": false}}, nil)
	return err
}

// DeleteUser deletes the user.
func (k *Keystone) DeleteUser(ctx context.Context, userID string) error {
	_, err := k.admin(ctx, http.MethodDelete, "/users/"+url.PathEscape(userID), nil, nil, nil)
	return err
}

// RoleID returns the id of the role with the given name ("admin", "member" and
// "reader" exist after bootstrap).
func (k *Keystone) RoleID(ctx context.Context, name string) (string, error) {
	var out struct{ Roles []idOnly }
	if _, err := k.admin(ctx, http.MethodGet, "/roles?name="+url.QueryEscape(name), nil, nil, &out); err != nil {
		return "", err
	}
	if len(out.Roles) != 1 {
		return "", fmt.Errorf("keystonetest: %d roles named %q, want 1", len(out.Roles), name)
	}
	return out.Roles[0].ID, nil
}

// EnsureRole returns the id of the role with the given name, creating it when
// it does not exist.
func (k *Keystone) EnsureRole(ctx context.Context, name string) (string, error) {
	if id, err := k.RoleID(ctx, name); err == nil {
		return id, nil
	}
	var out struct{ Role idOnly }
	_, err := k.admin(ctx, http.MethodPost, "/roles", nil, map[string]any{"role": map[string]any{"name": name}}, &out)
	if err != nil {
		if id, err2 := k.RoleID(ctx, name); err2 == nil { // created concurrently
			return id, nil
		}
	}
	return out.Role.ID, err
}

// AssignProjectRole gives the user the role on the project.
func (k *Keystone) AssignProjectRole(ctx context.Context, userID, projectID, roleID string) error {
	_, err := k.admin(ctx, http.MethodPut, fmt.Sprintf("/projects/%s/users/%s/roles/%s",
		url.PathEscape(projectID), url.PathEscape(userID), url.PathEscape(roleID)), nil, nil, nil)
	return err
}

// AssignGroupProjectRole gives the group the role on the project.
func (k *Keystone) AssignGroupProjectRole(ctx context.Context, groupID, projectID, roleID string) error {
	_, err := k.admin(ctx, http.MethodPut, fmt.Sprintf("/projects/%s/groups/%s/roles/%s",
		url.PathEscape(projectID), url.PathEscape(groupID), url.PathEscape(roleID)), nil, nil, nil)
	return err
}

// CreateGroup creates a group in the Default domain and returns its id.
func (k *Keystone) CreateGroup(ctx context.Context, name string) (string, error) {
	var out struct{ Group idOnly }
	_, err := k.admin(ctx, http.MethodPost, "/groups", nil,
		map[string]any{"group": map[string]any{"name": name, "domain_id": "default"}}, &out)
	return out.Group.ID, err
}

// AddUserToGroup adds the user to the group.
func (k *Keystone) AddUserToGroup(ctx context.Context, groupID, userID string) error {
	_, err := k.admin(ctx, http.MethodPut, fmt.Sprintf("/groups/%s/users/%s",
		url.PathEscape(groupID), url.PathEscape(userID)), nil, nil, nil)
	return err
}

// RemoveUserFromGroup removes the user from the group. Keystone records a
// revocation event for the user.
func (k *Keystone) RemoveUserFromGroup(ctx context.Context, groupID, userID string) error {
	_, err := k.admin(ctx, http.MethodDelete, fmt.Sprintf("/groups/%s/users/%s",
		url.PathEscape(groupID), url.PathEscape(userID)), nil, nil, nil)
	return err
}

// IssueToken authenticates the user (by id) with its password, scoped to the
// project (unscoped when projectID is empty), and returns the token and the
// answer's body ({"token": {...}}).
func (k *Keystone) IssueToken(ctx context.Context, userID, password, projectID string) (string, []byte, error) {
	var scope map[string]any
	if projectID != "" {
		scope = map[string]any{"project": map[string]any{"id": projectID}}
	}
	return k.passwordToken(ctx, map[string]any{"id": userID, "password": password}, scope)
}

// TokenBody validates the token with GET /v3/auth/tokens (as the admin) and
// returns the answer's body, {"token": {...}}: what keystonemiddleware caches.
func (k *Keystone) TokenBody(ctx context.Context, token string) ([]byte, error) {
	var body []byte
	_, err := k.admin(ctx, http.MethodGet, "/auth/tokens", http.Header{"X-Subject-Token": {token}}, nil, &body)
	return body, err
}

// RevokeToken revokes one token with DELETE /v3/auth/tokens (as the admin).
// Keystone records a revocation event with the token's audit id and publishes
// no notification.
func (k *Keystone) RevokeToken(ctx context.Context, token string) error {
	_, err := k.admin(ctx, http.MethodDelete, "/auth/tokens", http.Header{"X-Subject-Token": {token}}, nil, nil)
	return err
}

// CreateApplicationCredential creates an application credential for the user,
// authenticated by the user's own token, and returns its id and secret.
func (k *Keystone) CreateApplicationCredential(ctx context.Context, userID, userToken, name string) (id, secret string, err error) {
	var out struct {
		ApplicationCredential struct {
			ID     string `json:"id"`
			Secret string `json:"secret"`
		} `json:"application_credential"`
	}
	_, err = k.Request(ctx, http.MethodPost, "/users/"+url.PathEscape(userID)+"/application_credentials", userToken, nil,
		map[string]any{"application_credential": map[string]any{"name": name}}, &out)
	return out.ApplicationCredential.ID, out.ApplicationCredential.Secret, err
}

// RevocationEvents returns GET /v3/OS-REVOKE/events as Keystone answers it
// (the "events" list, each event as a JSON object).
func (k *Keystone) RevocationEvents(ctx context.Context) ([]map[string]any, error) {
	var out struct {
		Events []map[string]any `json:"events"`
	}
	_, err := k.admin(ctx, http.MethodGet, "/OS-REVOKE/events", nil, nil, &out)
	return out.Events, err
}

// UniqueName returns prefix followed by a random suffix, for users, projects
// and groups of one test in a Keystone shared by several.
func UniqueName(prefix string) string { return prefix + "-" + randomHex(5) }

// Admin sends one request as the admin user (see Request), getting a new admin
// token once when Keystone answers 401.
func (k *Keystone) Admin(ctx context.Context, method, path string, in, out any) error {
	_, err := k.admin(ctx, method, path, nil, in, out)
	return err
}

// Authenticate posts auth ({"identity": ..., "scope": ...}) to /auth/tokens and
// returns the token and the answer's body: for trust-scoped or application
// credential tokens, which IssueToken does not make.
func (k *Keystone) Authenticate(ctx context.Context, auth map[string]any) (string, []byte, error) {
	var body []byte
	h, err := k.Request(ctx, http.MethodPost, "/auth/tokens", "", nil, map[string]any{"auth": auth}, &body)
	if err != nil {
		return "", nil, err
	}
	tok := h.Get("X-Subject-Token")
	if tok == "" {
		return "", nil, fmt.Errorf("keystonetest: POST /auth/tokens: no X-Subject-Token in the answer")
	}
	return tok, body, nil
}
