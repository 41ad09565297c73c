import net from 'node:net';
import pino, { type Logger } from 'pino';
import { ConfigError, ConflictError, NotFoundError } from '../../../shared/errors';
import { NbdExport } from './export';
import {
  MAX_OPTION_BYTES,
  MAX_PAYLOAD_SIZE,
  MIN_BLOCK_SIZE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPTS_MAGIC,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_SERVER,
  PREFERRED_BLOCK_SIZE,
  REQUEST_HEADER_BYTES,
  SIMPLE_REPLY_HEADER_BYTES,
  COMMAND_NAMES,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionReply,
  encodeServerEntry,
  parseRequestHeader,
  writeSimpleReplyHeader,
  type RequestHeader,
} from './protocol';

export interface NbdServerOptions {
  /** Exports served from the start; more can be added with addExport. */
  exports?: NbdExport[];
  /** The export an empty name (NBD_OPT_EXPORT_NAME "" or NBD_OPT_GO "") selects; by default the only export, if there is one. */
  defaultExport?: string;
  logger?: Logger;
  /** Requests a connection may have in progress before the server stops reading from it. Default 256. */
  maxRequestsInFlight?: number;
  /** Payload and read bytes a connection may hold before the server stops reading from it. Default 128 MiB. */
  maxBytesInFlight?: number;
}

export interface ListenOptions {
  /** Default 10809, NBD's own port; 0 picks a free one. */
  port?: number;
  /** Default 127.0.0.1. */
  host?: string;
}

/**
 * An NBD server (fixed newstyle handshake, simple replies) serving several exports by name to
 * several clients, each with many requests in flight.
 */
export class NbdServer {
  private readonly exportsByName = new Map<string, NbdExport>();
  private readonly connections = new Set<Connection>();
  private readonly server: net.Server;
  readonly logger: Logger;
  readonly maxRequestsInFlight: number;
  readonly maxBytesInFlight: number;
  private readonly defaultExportName?: string;
  private closing = false;

  constructor(options: NbdServerOptions = {}) {
    this.logger = options.logger ?? pino({ level: 'silent' });
    this.maxRequestsInFlight = options.maxRequestsInFlight ?? 256;
    this.maxBytesInFlight = options.maxBytesInFlight ?? 128 * 1024 * 1024;
    if (this.maxRequestsInFlight < 1 || this.maxBytesInFlight < MAX_PAYLOAD_SIZE) {
      throw new ConfigError(
        `NBD server limits are too small: maxRequestsInFlight must be at least 1 and maxBytesInFlight at least ${MAX_PAYLOAD_SIZE} (one maximal request).`,
        'maxBytesInFlight',
      );
    }
    this.defaultExportName = options.defaultExport;
    for (const e of options.exports ?? []) this.addExport(e);
    this.server = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
  }

  get isClosing(): boolean {
    return this.closing;
  }

  addExport(exp: NbdExport): void {
    if (this.exportsByName.has(exp.name)) {
      throw new ConflictError(
        `An NBD export named ${exp.name} is already served; give each disk its own name.`,
        'name',
      );
    }
    this.exportsByName.set(exp.name, exp);
  }

  /** Stops offering an export to new clients (connections already using it keep it). */
  removeExport(name: string): NbdExport | undefined {
    const exp = this.exportsByName.get(name);
    this.exportsByName.delete(name);
    return exp;
  }

  getExport(name: string): NbdExport | undefined {
    return this.exportsByName.get(name);
  }

  get exports(): NbdExport[] {
    return [...this.exportsByName.values()];
  }

  /** The export a client's name selects, or undefined. */
  lookup(name: string): NbdExport | undefined {
    if (name !== '') return this.exportsByName.get(name);
    if (this.defaultExportName !== undefined) return this.exportsByName.get(this.defaultExportName);
    return this.exportsByName.size === 1 ? this.exports[0] : undefined;
  }

  async listen(options: ListenOptions = {}): Promise<net.AddressInfo> {
    const port = options.port ?? 10809;
    const host = options.host ?? '127.0.0.1';
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => reject(err);
      this.server.once('error', onError);
      this.server.listen(port, host, () => {
        this.server.off('error', onError);
        resolve();
      });
    });
    const address = this.address();
    this.logger.info(
      { host: address.address, port: address.port, exports: this.exports.map((e) => e.name) },
      'NBD server listening',
    );
    return address;
  }

  address(): net.AddressInfo {
    const a = this.server.address();
    if (!a || typeof a === 'string')
      throw new ConflictError('The NBD server is not listening on TCP.', 'server');
    return a;
  }

  /**
   * Pauses the named exports (all by default) at one instant — every pause takes effect
   * synchronously before this returns its promise — and resolves once all of them are drained.
   * The journals then end at a consistent cut across those disks: cut the marker, then resume().
   */
  pause(names?: string[]): Promise<void> {
    const exps = this.select(names);
    return Promise.all(exps.map((e) => e.pause())).then(() => undefined);
  }

  resume(names?: string[]): void {
    for (const e of this.select(names)) e.resume();
  }

  /** pause(names), run `cut` (e.g. append a marker to each journal), then resume, even if cut throws. */
  async quiesce<T>(names: string[] | undefined, cut: () => Promise<T> | T): Promise<T> {
    const exps = this.select(names);
    const drained = Promise.all(exps.map((e) => e.pause()));
    try {
      await drained;
      return await cut();
    } finally {
      for (const e of exps) e.resume();
    }
  }

  /**
   * Stops listening, stops reading from every connection, lets admitted requests finish and their
   * replies go out, then closes the sockets. Exports are not closed (their owner closes them).
   */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all([...this.connections].map((c) => c.shutdown()));
    await closed;
  }

  private select(names?: string[]): NbdExport[] {
    if (!names) return this.exports;
    return names.map((n) => {
      const e = this.exportsByName.get(n);
      if (!e)
        throw new NotFoundError(
          `There is no NBD export named ${n}; served: ${this.exports.map((x) => x.name).join(', ') || 'none'}.`,
          'export',
        );
      return e;
    });
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const conn = new Connection(this, socket);
    this.connections.add(conn);
    socket.once('close', () => this.connections.delete(conn));
  }
}

type State =
  | 'client-flags'
  | 'option-header'
  | 'option-data'
  | 'option-discard'
  | 'request'
  | 'payload'
  | 'payload-discard'
  | 'done';

const EMPTY = Buffer.alloc(0);

/** One client connection: handshake, then the transmission phase. */
class Connection {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private state: State = 'client-flags';
  private need = 4;
  private noZeroes = false;
  private option = 0;
  private optionLength = 0;
  private export: NbdExport | undefined;
  private request: RequestHeader | undefined;
  /** Error to answer once a refused write's payload has been consumed. */
  private discardError = 0;
  private requestsInFlight = 0;
  private bytesInFlight = 0;
  private readingPaused = false;
  private outgoing: Buffer[] = [];
  private outgoingBytes = 0;
  private sendScheduled = false;
  private idleWaiters: (() => void)[] = [];
  private readonly log: Logger;

  constructor(
    private readonly server: NbdServer,
    private readonly socket: net.Socket,
  ) {
    this.log = server.logger.child({ client: `${socket.remoteAddress}:${socket.remotePort}` });
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.log.debug({ err }, 'NBD connection error'));
    // A client slow to read its replies stops being read from until they drain.
    socket.on('drain', () => this.maybeResumeReading());
    socket.on('close', () => {
      this.state = 'done';
      this.chunks = [];
      this.buffered = 0;
    });
    socket.write(encodeGreeting());
  }

  /** Stops reading; resolves when in-flight requests are answered and the socket is closed. */
  async shutdown(): Promise<void> {
    if (this.socket.destroyed) return;
    const inTransmission = this.export !== undefined;
    this.state = 'done';
    this.chunks = [];
    this.buffered = 0;
    this.socket.pause();
    if (!inTransmission) {
      this.socket.destroy();
      return;
    }
    await this.idle();
    await new Promise<void>((resolve) => setImmediate(resolve)); // let queued replies leave
    await new Promise<void>((resolve) => {
      if (this.socket.destroyed) return resolve();
      this.socket.once('close', () => resolve());
      this.socket.end();
    });
  }

  private idle(): Promise<void> {
    if (this.requestsInFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private onData(chunk: Buffer): void {
    if (this.state === 'done') return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.process();
  }

  /** Consumes exactly n buffered bytes (the caller checked they are there). */
  private take(n: number): Buffer {
    if (n === 0) return EMPTY;
    const first = this.chunks[0];
    if (first.length >= n) {
      this.buffered -= n;
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.length === n ? first : first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - filled);
      c.copy(out, filled, 0, k);
      filled += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }

  /** Drops up to n buffered bytes; returns how many were dropped. */
  private skip(n: number): number {
    let dropped = 0;
    while (dropped < n && this.chunks.length > 0) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - dropped);
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
      dropped += k;
    }
    this.buffered -= dropped;
    return dropped;
  }

  private process(): void {
    for (;;) {
      switch (this.state) {
        case 'done':
          return;
        case 'option-discard':
        case 'payload-discard': {
          this.need -= this.skip(this.need);
          if (this.need > 0) return;
          if (this.state === 'option-discard') {
            this.replyOption(NBD_REP_ERR_TOO_BIG, Buffer.from('option data too long'));
            this.expect('option-header', 16);
          } else {
            this.sendError(this.request as RequestHeader, this.discardError);
            this.expect('request', REQUEST_HEADER_BYTES);
          }
          continue;
        }
        default:
          break;
      }
      if (this.state === 'request' && this.overloaded()) {
        this.pauseReading();
        return;
      }
      if (this.buffered < this.need) return;
      const bytes = this.take(this.need);
      switch (this.state) {
        case 'client-flags':
          this.onClientFlags(bytes.readUInt32BE(0));
          break;
        case 'option-header':
          this.onOptionHeader(bytes);
          break;
        case 'option-data':
          this.onOption(this.option, bytes);
          break;
        case 'request':
          this.onRequest(bytes);
          break;
        case 'payload':
          this.onWritePayload(bytes);
          break;
      }
    }
  }

  private expect(state: State, need: number): void {
    this.state = state;
    this.need = need;
  }

  private hangUp(reason: string): void {
    this.log.warn({ export: this.export?.name }, `NBD client dropped: ${reason}`);
    this.state = 'done';
    this.chunks = [];
    this.buffered = 0;
    this.socket.destroy();
  }

  // ---- handshake ----

  private onClientFlags(flags: number): void {
    if ((flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0) {
      this.hangUp(`unknown client flags 0x${flags.toString(16)}`);
      return;
    }
    this.noZeroes = (flags & NBD_FLAG_C_NO_ZEROES) !== 0;
    this.expect('option-header', 16);
  }

  private onOptionHeader(b: Buffer): void {
    if (b.readBigUInt64BE(0) !== NBD_OPTS_MAGIC) {
      this.hangUp('bad option magic');
      return;
    }
    this.option = b.readUInt32BE(8);
    this.optionLength = b.readUInt32BE(12);
    if (this.optionLength > MAX_OPTION_BYTES) this.expect('option-discard', this.optionLength);
    else this.expect('option-data', this.optionLength);
  }

  private replyOption(type: number, data?: Buffer): void {
    this.socket.write(encodeOptionReply(this.option, type, data));
  }

  private onOption(option: number, data: Buffer): void {
    this.expect('option-header', 16);
    if (this.server.isClosing) {
      this.replyOption(NBD_REP_ERR_SHUTDOWN);
      return;
    }
    switch (option) {
      case NBD_OPT_EXPORT_NAME: {
        const exp = this.server.lookup(data.toString('utf8'));
        if (!exp) {
          // EXPORT_NAME cannot carry an error: the protocol says to close.
          this.hangUp(`unknown export ${JSON.stringify(data.toString('utf8'))}`);
          return;
        }
        this.socket.write(encodeExportNameReply(exp.size, exp.transmissionFlags, this.noZeroes));
        this.enterTransmission(exp);
        return;
      }
      case NBD_OPT_ABORT:
        this.replyOption(NBD_REP_ACK);
        this.state = 'done';
        this.socket.end();
        return;
      case NBD_OPT_LIST:
        if (data.length !== 0) {
          this.replyOption(NBD_REP_ERR_INVALID, Buffer.from('NBD_OPT_LIST takes no data'));
          return;
        }
        for (const e of this.server.exports)
          this.replyOption(NBD_REP_SERVER, encodeServerEntry(e.name, e.description));
        this.replyOption(NBD_REP_ACK);
        return;
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        this.onInfoOrGo(option, data);
        return;
      default:
        // STRUCTURED_REPLY, STARTTLS, META_CONTEXT, EXTENDED_HEADERS and anything unknown.
        this.replyOption(NBD_REP_ERR_UNSUP);
    }
  }

  private onInfoOrGo(option: number, data: Buffer): void {
    if (data.length < 6) {
      this.replyOption(NBD_REP_ERR_INVALID, Buffer.from('option too short'));
      return;
    }
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6) {
      this.replyOption(NBD_REP_ERR_INVALID, Buffer.from('name length exceeds option length'));
      return;
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * count) {
      this.replyOption(
        NBD_REP_ERR_INVALID,
        Buffer.from('information request count does not match option length'),
      );
      return;
    }
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(data.readUInt16BE(6 + nameLength + 2 * i));
    const exp = this.server.lookup(name);
    if (!exp) {
      this.replyOption(NBD_REP_ERR_UNKNOWN, Buffer.from(`no export named ${JSON.stringify(name)}`));
      return;
    }
    this.replyOption(NBD_REP_INFO, encodeInfoExport(exp.size, exp.transmissionFlags));
    // Sent whether asked or not (the protocol allows it): clients must keep to 512-byte alignment.
    this.replyOption(
      NBD_REP_INFO,
      encodeInfoBlockSize(MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD_SIZE),
    );
    if (requested.has(NBD_INFO_NAME))
      this.replyOption(NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, exp.name));
    if (requested.has(NBD_INFO_DESCRIPTION) && exp.description !== undefined) {
      this.replyOption(NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, exp.description));
    }
    this.replyOption(NBD_REP_ACK);
    if (option === NBD_OPT_GO) this.enterTransmission(exp);
  }

  private enterTransmission(exp: NbdExport): void {
    this.export = exp;
    this.log.info({ export: exp.name }, 'NBD client attached');
    this.expect('request', REQUEST_HEADER_BYTES);
  }

  // ---- transmission ----

  private overloaded(): boolean {
    return (
      this.requestsInFlight >= this.server.maxRequestsInFlight ||
      this.bytesInFlight + this.outgoingBytes + this.socket.writableLength >= this.server.maxBytesInFlight
    );
  }

  private pauseReading(): void {
    if (!this.readingPaused) {
      this.readingPaused = true;
      this.socket.pause();
    }
  }

  private begin(bytes: number): void {
    this.requestsInFlight += 1;
    this.bytesInFlight += bytes;
  }

  private end(bytes: number): void {
    this.requestsInFlight -= 1;
    this.bytesInFlight -= bytes;
    if (this.requestsInFlight === 0 && this.idleWaiters.length > 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
    this.maybeResumeReading();
  }

  private maybeResumeReading(): void {
    if (this.readingPaused && !this.overloaded() && this.state !== 'done') {
      this.readingPaused = false;
      this.socket.resume();
      this.process();
    }
  }

  private onRequest(b: Buffer): void {
    const req = parseRequestHeader(b);
    const exp = this.export as NbdExport;
    if (!req) {
      this.hangUp('bad request magic');
      return;
    }
    this.expect('request', REQUEST_HEADER_BYTES);
    switch (req.type) {
      case NBD_CMD_READ: {
        const err = this.check(req, exp, NBD_CMD_FLAG_FUA, false);
        if (err) return this.sendError(req, err);
        return this.read(req, exp);
      }
      case NBD_CMD_WRITE: {
        const err = this.check(req, exp, NBD_CMD_FLAG_FUA, true);
        if (err) {
          // Consume the payload without keeping it, then answer.
          this.request = req;
          this.discardError = err;
          this.expect('payload-discard', req.length);
          return;
        }
        this.request = req;
        this.begin(req.length);
        this.expect('payload', req.length);
        return;
      }
      case NBD_CMD_TRIM:
      case NBD_CMD_WRITE_ZEROES: {
        const allowed =
          req.type === NBD_CMD_TRIM ? NBD_CMD_FLAG_FUA : NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;
        const err = this.check(req, exp, allowed, true);
        if (err) return this.sendError(req, err);
        if (req.length === 0) return this.sendError(req, 0);
        this.begin(0);
        const kind = req.type === NBD_CMD_TRIM ? 'trim' : 'zero';
        exp
          .mutate(kind, Number(req.offset), req.length, undefined, (req.flags & NBD_CMD_FLAG_FUA) !== 0)
          .then((errno) => this.finish(req, errno, 0));
        return;
      }
      case NBD_CMD_FLUSH: {
        if ((req.flags & ~NBD_CMD_FLAG_FUA) !== 0) return this.sendError(req, NBD_EINVAL);
        this.begin(0);
        exp.flush().then(
          () => this.finish(req, 0, 0),
          () => this.finish(req, NBD_EIO, 0),
        );
        return;
      }
      case NBD_CMD_DISC:
        this.state = 'done';
        this.chunks = [];
        this.buffered = 0;
        this.log.info({ export: exp.name }, 'NBD client disconnecting');
        void this.idle().then(() => setImmediate(() => this.socket.end()));
        return;
      default:
        // CACHE, BLOCK_STATUS (never advertised) and unknown commands.
        this.log.debug({ type: COMMAND_NAMES[req.type] ?? req.type }, 'unsupported NBD command');
        return this.sendError(req, NBD_EINVAL);
    }
  }

  /** Validates flags, permission, size and range; returns an NBD error or 0. */
  private check(req: RequestHeader, exp: NbdExport, allowedFlags: number, mutating: boolean): number {
    if ((req.flags & ~allowedFlags) !== 0) return NBD_EINVAL;
    if (mutating && exp.readOnly) return NBD_EPERM;
    if ((req.type === NBD_CMD_READ || req.type === NBD_CMD_WRITE) && req.length > MAX_PAYLOAD_SIZE)
      return NBD_EINVAL;
    if (req.offset % BigInt(MIN_BLOCK_SIZE) !== 0n || req.length % MIN_BLOCK_SIZE !== 0) return NBD_EINVAL;
    if (req.offset + BigInt(req.length) > BigInt(exp.size)) return mutating ? NBD_ENOSPC : NBD_EINVAL;
    return 0;
  }

  private read(req: RequestHeader, exp: NbdExport): void {
    const out = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES + req.length);
    this.begin(req.length);
    const done = (): void => {
      writeSimpleReplyHeader(out, 0, 0, req.handle);
      this.send(out);
      this.end(req.length);
    };
    if (req.length === 0) return done();
    exp.read(Number(req.offset), req.length, out, SIMPLE_REPLY_HEADER_BYTES).then(done, (err: Error) => {
      this.log.error(
        { err, export: exp.name, offset: Number(req.offset), length: req.length },
        'NBD read failed',
      );
      this.finish(req, NBD_EIO, req.length);
    });
  }

  private onWritePayload(data: Buffer): void {
    const req = this.request as RequestHeader;
    const exp = this.export as NbdExport;
    this.expect('request', REQUEST_HEADER_BYTES);
    if (req.length === 0) return this.finish(req, 0, 0);
    exp
      .mutate('write', Number(req.offset), req.length, data, (req.flags & NBD_CMD_FLAG_FUA) !== 0)
      .then((errno) => this.finish(req, errno, req.length));
  }

  private finish(req: RequestHeader, errno: number, bytes: number): void {
    this.sendError(req, errno);
    this.end(bytes);
  }

  /** A simple reply without payload (errno 0 is success). */
  private sendError(req: RequestHeader, errno: number): void {
    const b = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
    writeSimpleReplyHeader(b, 0, errno, req.handle);
    this.send(b);
  }

  /**
   * Queues a reply; all replies completed in one turn of the event loop leave in one writev
   * (a syscall per reply costs more than the rest of a 4 KiB write).
   */
  private send(b: Buffer): void {
    if (this.socket.destroyed) return;
    this.outgoing.push(b);
    this.outgoingBytes += b.length;
    if (!this.sendScheduled) {
      this.sendScheduled = true;
      setImmediate(this.sendQueued);
    }
  }

  private readonly sendQueued = (): void => {
    this.sendScheduled = false;
    const out = this.outgoing;
    this.outgoing = [];
    this.outgoingBytes = 0;
    if (this.socket.destroyed || out.length === 0) return;
    if (out.length === 1) {
      this.socket.write(out[0]);
    } else {
      this.socket.cork();
      for (const b of out) this.socket.write(b);
      this.socket.uncork();
    }
    this.maybeResumeReading();
  };
}
