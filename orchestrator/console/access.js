// Access: API tokens and automation logins (admins), enrollment tokens
// (operators) with the command that starts an agent, and registry
// credentials (everyone reads, admins change). Each section is shown only
// to the roles the API lets use it; secrets are shown once, when made.

import { get, post, put, del, enc } from './api.js';
import { h, fill, section, table, badge, ago, time, button, form, field, showError, notify, secretBox } from './ui.js';

/** The agent command for an enrollment token: the token goes in the environment, never in argv. */
export function agentCommand(broker, token, device) {
  return `DROVER_ENROLL_TOKEN=${token} drover-agent --broker ${broker}${device ? ` --device-id ${device}` : ''}`;
}

function tokensSection() {
  const list = h('div');
  const out = h('div');
  async function load() {
    try {
      const tokens = await get('/api/v1/tokens');
      fill(list, table(['Name', 'Role', 'Made', 'By', ''], tokens.map((t) => h('tr', { data: { test: 'token-row', token: t.name } },
        h('td', {}, t.name), h('td', {}, badge(t.role)), h('td', {}, ago(t.created_at_ms)), h('td', {}, t.created_by),
        h('td', {}, button('Delete', async () => {
          await del(`/api/v1/tokens/${enc(t.id)}`);
          notify(`Token ${t.name} deleted: it no longer signs anyone in.`, 'ok');
          load();
        }, { class: 'small danger', confirm: `Delete the API token ${t.name}? Whoever uses it is refused from now on.`, 'aria-label': `Delete token ${t.name}` }))))));
    } catch (e) {
      showError(e, 'reading API tokens');
    }
  }
  const f = form({ id: 'token-form', class: 'inline', 'aria-label': 'creating the API token' }, [
    field('Name', { name: 'name', required: true, placeholder: 'ci', 'data-field': 'name' }),
    field('Role', { tag: 'select', name: 'role', value: 'viewer', 'data-field': 'role', options: [['viewer', 'viewer'], ['operator', 'operator'], ['admin', 'admin']] }),
    h('button', { type: 'submit', class: 'primary' }, 'Create token'),
  ], async (v, fm) => {
    const t = await post('/api/v1/tokens', { name: v.name.trim(), role: v.role });
    fm.reset();
    fill(out, secretBox(`API token ${t.name} (${t.role})`, t.token, null, 'token-secret'));
    load();
  });
  load();
  return section('API tokens', null, h('p', { class: 'muted' }, 'For the CLI, scripts and this console. Viewers read; operators also deploy and enroll; admins do everything.'), list, f, out);
}

function enrollSection(can) {
  const list = h('div');
  const out = h('div');
  async function load() {
    try {
      const tokens = await get('/api/v1/enrollment-tokens');
      fill(list, tokens.length ? table(['Id', 'For device', 'Uses left', 'Expires', 'By', ''], tokens.map((t) => h('tr', { data: { test: 'enroll-row', token: t.id } },
        h('td', { class: 'mono' }, t.id), h('td', {}, t.device || 'any'), h('td', { class: 'num' }, String(t.uses_left)),
        h('td', {}, t.expires_at_ms < Date.now() ? badge('expired') : time(t.expires_at_ms)), h('td', {}, t.created_by),
        h('td', {}, button('Withdraw', async () => {
          await del(`/api/v1/enrollment-tokens/${enc(t.id)}`);
          load();
        }, { class: 'small danger', 'aria-label': `Withdraw enrollment token ${t.id}` }))))) : h('p', { class: 'muted' }, 'No open enrollment tokens.'));
    } catch (e) {
      showError(e, 'reading enrollment tokens');
    }
  }
  const broker = `mqtt://${location.hostname}:1883`;
  const f = form({ id: 'enroll-form', 'aria-label': 'creating the enrollment token' }, [
    h('div', { class: 'form-cols' },
      field('Valid for (seconds)', { name: 'ttl_secs', type: 'number', min: 1, value: '3600', 'data-field': 'ttl_secs' }),
      field('Uses', { name: 'uses', type: 'number', min: 1, value: '1', 'data-field': 'uses' }),
      field('Only for device id', { name: 'device_id', class: 'mono', placeholder: 'any device', 'data-field': 'device_id' }),
      field('Broker address the device uses', { name: 'broker', class: 'mono', value: broker },
        'Only for the command below: the orchestrator\'s MQTT address as devices reach it.')),
    h('button', { type: 'submit', class: 'primary' }, 'Create enrollment token'),
  ], async (v) => {
    const body = { ttl_secs: Number(v.ttl_secs), uses: Number(v.uses) };
    if (v.device_id.trim()) body.device_id = v.device_id.trim();
    const t = await post('/api/v1/enrollment-tokens', body);
    const cmd = agentCommand(v.broker.trim() || broker, t.token, t.device || v.device_id.trim());
    fill(out,
      secretBox('Enrollment token', t.token, `Shown only now. Valid until ${time(t.expires_at_ms)}, ${t.uses_left} use${t.uses_left === 1 ? '' : 's'}.`, 'enroll-token'),
      h('div', { class: 'secret', data: { test: 'agent-command' } }, h('strong', {}, 'On the device, run:'),
        h('div', { class: 'copyline' }, h('code', { class: 'copytext' }, cmd),
          button('Copy', async () => {
            if (navigator.clipboard && window.isSecureContext) {
              await navigator.clipboard.writeText(cmd);
              notify('Copied', 'ok');
            } else {
              window.getSelection().selectAllChildren(out.querySelector('[data-test=agent-command] code'));
              notify('Selected: press Ctrl+C to copy', 'info');
            }
          }, { class: 'small' })),
        h('p', {}, 'Add ', h('code', {}, '--tls-ca ca.pem'), ' for an mqtts:// broker. The token goes in the environment (or ',
          h('code', {}, '--enroll-token-file'), '), never on the command line.')));
    load();
  });
  load();
  return section('Enrollment tokens', null, h('p', { class: 'muted' }, 'A device presents one once to get its own credential.'),
    list, can('operator') ? f : null, out);
}

function mqttUsersSection() {
  const list = h('div');
  const out = h('div');
  async function load() {
    try {
      const users = await get('/api/v1/mqtt-users');
      fill(list, users.length ? table(['Name', 'Username', 'Subscribe', 'Publish', 'Made', ''], users.map((u) => h('tr', { data: { test: 'mqtt-user-row', user: u.name } },
        h('td', {}, u.name), h('td', { class: 'mono' }, u.username),
        h('td', { class: 'mono' }, u.subscribe.join('\n')), h('td', { class: 'mono' }, u.publish.join('\n') || '–'),
        h('td', {}, ago(u.created_at_ms)),
        h('td', {}, button('Delete', async () => {
          await del(`/api/v1/mqtt-users/${enc(u.name)}`);
          load();
        }, { class: 'small danger', confirm: `Delete the automation login ${u.name}? Its connections are closed.`, 'aria-label': `Delete automation login ${u.name}` }))))) :
        h('p', { class: 'muted' }, 'No automation logins.'));
    } catch (e) {
      showError(e, 'reading automation logins');
    }
  }
  const split = (s) => s.split('\n').map((l) => l.trim()).filter(Boolean);
  const f = form({ id: 'mqtt-user-form', 'aria-label': 'creating the automation login' }, [
    h('div', { class: 'form-cols' },
      field('Name', { name: 'name', required: true, placeholder: 'nodered', 'data-field': 'name' }),
      field('May subscribe to', { tag: 'textarea', name: 'subscribe', class: 'mono', placeholder: 'empty: what devices report', 'data-field': 'subscribe' }, 'One topic filter a line.'),
      field('May publish to', { tag: 'textarea', name: 'publish', class: 'mono', placeholder: 'nothing', 'data-field': 'publish' }, 'One topic filter a line.')),
    h('button', { type: 'submit', class: 'primary' }, 'Create login'),
  ], async (v, fm) => {
    const body = { name: v.name.trim(), publish: split(v.publish) };
    if (split(v.subscribe).length) body.subscribe = split(v.subscribe);
    const u = await post('/api/v1/mqtt-users', body);
    fm.reset();
    fill(out, secretBox(`MQTT login ${u.username}`, u.password, 'The password, shown only now.', 'mqtt-password'));
    load();
  });
  load();
  return section('Automation logins (MQTT)', null, h('p', { class: 'muted' }, 'Broker identities for Node-RED, Home Assistant and scripts.'), list, f, out);
}

function registriesSection(can) {
  const list = h('div');
  async function load() {
    try {
      const regs = await get('/api/v1/registries');
      fill(list, regs.length ? table(['Registry', 'Username', 'Password', 'Changed', ''], regs.map((r) => h('tr', { data: { test: 'registry-row', host: r.host } },
        h('td', { class: 'mono' }, r.host), h('td', {}, r.username), h('td', {}, r.password_set ? 'set' : 'not set'), h('td', {}, ago(r.updated_at_ms)),
        h('td', {}, can('admin') ? button('Delete', async () => {
          await del(`/api/v1/registries/${enc(r.host)}`);
          load();
        }, { class: 'small danger', confirm: `Delete the credentials for ${r.host}? Devices can no longer pull private images from it.`, 'aria-label': `Delete credentials for ${r.host}` }) : null)))) :
        h('p', { class: 'muted' }, 'No registry credentials stored.'));
    } catch (e) {
      showError(e, 'reading registries');
    }
  }
  const f = form({ id: 'registry-form', class: 'inline', 'aria-label': 'storing the registry credentials' }, [
    field('Registry host', { name: 'host', required: true, class: 'mono', placeholder: '127.0.0.1:5001', 'data-field': 'host' }),
    field('Username', { name: 'username', required: true, 'data-field': 'username', autocomplete: 'off' }),
    field('Password', { name: 'password', type: 'password', required: true, 'data-field': 'password', autocomplete: 'new-password' }),
    h('button', { type: 'submit', class: 'primary' }, 'Store'),
  ], async (v, fm) => {
    await put(`/api/v1/registries/${enc(v.host.trim())}`, { username: v.username, password: v.password });
    fm.reset();
    notify(`Credentials for ${v.host.trim()} stored; devices pulling from it get them.`, 'ok');
    load();
  });
  load();
  return section('Private registries', null, list, can('admin') ? f : null);
}

export const access = {
  title: 'Access',
  mount(el, ctx) {
    fill(el, h('h1', {}, 'Access'),
      ctx.can('admin') ? tokensSection() : null,
      ctx.can('operator') ? enrollSection(ctx.can) : null,
      ctx.can('admin') ? mqttUsersSection() : null,
      registriesSection(ctx.can),
      ctx.can('operator') ? null : h('p', { class: 'muted' }, 'Tokens and logins are managed by operators and admins.'));
  },
};
